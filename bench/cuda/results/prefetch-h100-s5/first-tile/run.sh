python3 -m pip install -q --no-index --no-deps --target /tmp/site ../.whl/*.whl 2>/dev/null; python3 bench/cuda/device_setup.py /tmp/site > /dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/backends/reference:$PWD/backends/cuda
python3 - <<'PY'
import torch, accel_backend_cuda as c
K = c._kernels()
for pk in (0, 512):
    K.CONFIG["linear"] = {"prefetch_k": pk}
    for m, n, k in ((1, 16384, 2048), (4, 2048, 8192), (16, 128256, 2048), (3, 1000, 2056)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16); w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        y = c.accel_linear(x=x, weight=w, bias=None, prepared=None)
        ref = x.double() @ w.double().T
        print("pk", pk, (m, n, k), "max err", (y.double() - ref).abs().max().item())
PY
for c in pk0 pk512 pk128 pk2048 pk0b; do
  cf=${c%b}
  echo "== $c $(date +%T)"; timeout 100 python3 -u bench/cuda/bench_decode.py --out /tmp/res/$c --models llama-1b --batches 1,16 --hf-batches= --compiled-batches= --gen 96 --kernel-config cfg/$cf.json > /tmp/res_$c.log 2>&1; echo rc=$?
  grep "^| llama\|Error" /tmp/res_$c.log | head -8; cp /tmp/res/$c/summary.md $OUT/$c.md 2>/dev/null
done
