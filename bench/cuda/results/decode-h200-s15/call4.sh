#!/bin/bash
# For the next session (written in session 15, not yet run): batch 64 op by op with and without busy_elems
# (both models), then the final table.
O=$OUT
python3 - <<'PY'
import json, os
import accel_backend_cuda._triton_kernels as k
O = os.environ["OUT"]; ra = dict(k.CONFIG["rows_attention"], enabled=0); ad = dict(k.CONFIG["attn_decode"])
json.dump({"rows_attention": ra}, open(f"{O}/opnew.json", "w"))
json.dump({"rows_attention": ra, "attn_decode": {**ad, "busy_elems": 0}}, open(f"{O}/opold.json", "w"))
PY
for v in opold opnew; do
  timeout 80 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 64 --hf-batches "" --compiled-batches "" --gen 32 --kernel-config $O/$v.json --out $O/e2e-$v > $O/e2e.log.$v 2>&1; echo "e2e $v rc $?"; grep -E "^\| (llama|mixtral)" $O/e2e.log.$v
  cat $O/e2e.log.$v >> $O/e2e-ab.log; rm -rf $O/e2e-$v $O/e2e.log.$v $O/$v.json
done
timeout 290 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 1,16,64 --hf-batches 1 --compiled-batches 1 --gen 64 --out $O/e2e > $O/e2e.log 2>&1
echo "final rc $?"; grep -E "^\| (llama|mixtral)|copy" $O/e2e.log
