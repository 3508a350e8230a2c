#!/bin/bash
# Session 15, call 1: L2 prefetch of the layer's KV blocks (before the norm) and of the o_proj weight (from the
# fused rotary + attention programs), A/B end to end, Llama-1B batch 16 and 64.
O=$OUT
python3 - <<'PY'
import json, os
import accel_backend_cuda._triton_kernels as k
base = dict(k.CONFIG["rows_attention"])
v = {"kv": dict(l2_kv=1), "kvel": dict(l2_kv=2), "o": dict(l2_o=1), "kvo": dict(l2_kv=1, l2_o=1),
     "rows16": dict(min_programs=0), "rows16kvo": dict(min_programs=0, l2_kv=1, l2_o=1)}
for name, over in v.items():
    json.dump({"rows_attention": {**base, **over}}, open(os.path.join(os.environ["OUT"], name + ".json"), "w"))
print("base", base)
PY
run() {  # name batches
  kc=""; [ $1 != default ] && kc="--kernel-config $O/$1.json"
  timeout $3 python3 bench/cuda/bench_decode.py --models llama-1b --batches $2 --hf-batches "" --compiled-batches "" --gen 32 $kc --out $O/e2e-$1 > $O/e2e-$1.log 2>&1; echo "e2e $1 rc $?"; grep -E "^\| (llama|mixtral)" $O/e2e-$1.log
}
run default 16,64 150
run kv 16,64 85
run kvo 16,64 85
run o 16,64 85
run rows16kvo 16 60
run rows16 16 60
