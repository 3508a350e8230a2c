python3 -m pip install -q --no-index --no-deps --target /tmp/site ../.whl/*.whl 2>/dev/null; python3 bench/cuda/device_setup.py /tmp/site > /dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/backends/reference:$PWD/backends/cuda
python3 - <<'PY'
import torch, accel_backend_cuda as c
w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16); w0 = w.clone()
for mode in ("main", "side"):
    c._kernels().CONFIG["prefetch"]["mode"] = mode
    c.accel_prefetch_weight(weight=w); c.accel_prefetch_weight(weight=w[:, :4000])
    g = torch.cuda.CUDAGraph()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = c.accel_linear(x=x, weight=w, bias=None, prepared=None)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        c.accel_prefetch_weight(weight=w)
        y = c.accel_linear(x=x, weight=w, bias=None, prepared=None)
    g.replay(); torch.cuda.synchronize()
    ref = (x.float() @ w.float().T)
    print(mode, "weight unchanged", torch.equal(w, w0), "graph linear err", (y.float() - ref).abs().max().item())
PY
for c in off o_only all16 side16 side_o all8; do
  echo "== $c $(date +%T)"; timeout 110 python3 -u bench/cuda/bench_decode.py --out /tmp/res/$c --models llama-1b --batches 1,64 --hf-batches= --compiled-batches= --gen 96 --kernel-config cfg/$c.json > /tmp/res_$c.log 2>&1; echo rc=$?
  grep "^| llama\|Error" /tmp/res_$c.log | head -8; cp /tmp/res/$c/summary.md $OUT/$c.md 2>/dev/null
done
tail -30 /tmp/res_off.log
