python3 -m pip install -q --no-index --no-deps --target /tmp/site ../.whl/*.whl 2>/dev/null; python3 bench/cuda/device_setup.py /tmp/site > /dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/backends/reference:$PWD/backends/cuda
for a in none norm rope act attn norm,rope,act norm,rope,act,attn; do
  c=${a//,/+}
  echo "== $c $(date +%T)"; timeout 100 python3 -u bench/cuda/ablate_decode.py --ablate ${a/none/} --out /tmp/res/$c --models llama-1b --batches 1,64 --hf-batches= --compiled-batches= --gen 96 > /tmp/res_$c.log 2>&1; echo rc=$?
  grep "^| llama\|Error\|error" /tmp/res_$c.log | head -6
done
mkdir -p $OUT/abl; for d in /tmp/res/*; do cp $d/summary.md $OUT/abl/$(basename $d).md; done; ls $OUT/abl
