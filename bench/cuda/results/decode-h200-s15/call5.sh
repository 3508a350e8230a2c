#!/bin/bash
# For the next session (written in session 15, not yet run): (1) batch 1, both models: the persistent layer's
# o_proj by KV group behind ready flags (CONFIG decoder_layer FLAGS 1) against the grid barrier; (2) the final
# table.
O=$OUT
python3 - <<'PY'
import json, os
import accel_backend_cuda._triton_kernels as k
O = os.environ["OUT"]
json.dump({"decoder_layer": {**k.CONFIG["decoder_layer"], "FLAGS": 1}}, open(f"{O}/flags.json", "w"))
PY
for v in default flags; do
  kc=""; [ $v != default ] && kc="--kernel-config $O/$v.json"
  timeout 70 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 1 --hf-batches "" --compiled-batches "" --gen 48 $kc --out $O/e2e-$v > $O/e2e.log.$v 2>&1; echo "e2e $v rc $?"; grep -E "^\| (llama|mixtral)" $O/e2e.log.$v
  cat $O/e2e.log.$v >> $O/e2e-ab.log; rm -rf $O/e2e-$v $O/e2e.log.$v $O/$v.json
done
timeout 290 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 1,16,64 --hf-batches 1 --compiled-batches 1 --gen 64 --out $O/e2e > $O/e2e.log 2>&1
echo "final rc $?"; grep -E "^\| (llama|mixtral)|copy" $O/e2e.log
