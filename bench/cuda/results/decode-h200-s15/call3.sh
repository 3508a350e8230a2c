#!/bin/bash
# Session 15, call 3: decode attention's plain loop with 8192-element tiles where programs outnumber SMs
# (busy_elems): verify + time (micro), the kit, batch 64 op by op with and without it, and the final table.
O=$OUT
timeout 150 python3 bench/cuda/bench_small_m.py --sections verify_attn,attn --head-sizes 64,128 --attn-batches 1,16,32,64 --out $O/attn > $O/attn.log 2>&1
echo "attn rc $?"; grep -E "attn d=|FAIL|fail" $O/attn.log | head -40
timeout 170 python3 -m accel_models.cli check --backend cuda --quick --ops argmax,paged_attention,decoder_layer_decode,moe_decoder_layer_decode --no-models > $O/kit.txt 2>&1
echo "kit rc $?"; tail -8 $O/kit.txt
python3 - <<'PY'
import json, os
import accel_backend_cuda._triton_kernels as k
O = os.environ["OUT"]; ra = dict(k.CONFIG["rows_attention"], enabled=0); ad = dict(k.CONFIG["attn_decode"])
json.dump({"rows_attention": ra}, open(f"{O}/opnew.json", "w"))
json.dump({"rows_attention": ra, "attn_decode": {**ad, "busy_elems": 0}}, open(f"{O}/opold.json", "w"))
PY
for v in opold opnew; do
  timeout 75 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 64 --hf-batches "" --compiled-batches "" --gen 32 --kernel-config $O/$v.json --out $O/e2e-$v > $O/e2e-ab.log.$v 2>&1; echo "e2e $v rc $?"; grep -E "^\| (llama|mixtral)" $O/e2e-ab.log.$v
  cat $O/e2e-ab.log.$v >> $O/e2e-ab.log; rm -rf $O/e2e-$v $O/e2e-ab.log.$v $O/$v.json
done
timeout 290 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 1,16,64 --hf-batches 1 --compiled-batches 1 --gen 64 --out $O/e2e > $O/e2e.log 2>&1
echo "final rc $?"; grep -E "^\| (llama|mixtral)|copy" $O/e2e.log
rm -rf $O/attn
