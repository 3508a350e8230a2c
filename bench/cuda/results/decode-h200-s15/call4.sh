#!/bin/bash
# For the next session (written in session 15, not yet run): (1) Llama-1B's down_proj at batch 64 on the small-M
# kernel's wide tile (LINEAR_CONFIG wide = WIDE_DOWN) against cuBLAS; (2) batch 64 op by op with and without
# busy_elems (both models).
O=$OUT
python3 - <<'PY'
import json, os
import accel_backend_cuda as C
import accel_backend_cuda._triton_kernels as k
O = os.environ["OUT"]; ra = dict(k.CONFIG["rows_attention"], enabled=0); ad = dict(k.CONFIG["attn_decode"])
json.dump({"linear": {"wide": C.WIDE_DOWN}}, open(f"{O}/widedown.json", "w"))
json.dump({"rows_attention": ra}, open(f"{O}/opnew.json", "w"))
json.dump({"rows_attention": ra, "attn_decode": {**ad, "busy_elems": 0}}, open(f"{O}/opold.json", "w"))
PY
run() {  # name models timeout
  kc=""; [ $1 != default ] && kc="--kernel-config $O/$1.json"
  timeout $3 python3 bench/cuda/bench_decode.py --models $2 --batches 64 --hf-batches "" --compiled-batches "" --gen 32 $kc --out $O/e2e-$1 > $O/e2e.log.$1 2>&1; echo "e2e $1 rc $?"; grep -E "^\| (llama|mixtral)" $O/e2e.log.$1
  cat $O/e2e.log.$1 >> $O/e2e-ab.log; rm -rf $O/e2e-$1 $O/e2e.log.$1 $O/$1.json
}
run default llama-1b 70
run widedown llama-1b 50
run opold llama-1b,mixtral-small 80
run opnew llama-1b,mixtral-small 80
