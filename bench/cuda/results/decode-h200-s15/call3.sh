#!/bin/bash
# For the next session's first call (written in session 15, not yet run): verify + time the attention plan
# (busy_elems), the kit, and the fused rotary + attention items with their cached keys through the pipelined
# loop (rows_attention.pipe_stages) at batch 64 (Llama-1B), against the default.
O=$OUT
timeout 150 python3 bench/cuda/bench_small_m.py --sections verify_attn,attn --head-sizes 64,128 --attn-batches 1,16,32,64 --out $O/attn > $O/attn.log 2>&1
echo "attn rc $?"; grep -E "attn d=|FAIL|fail" $O/attn.log | head -40
timeout 170 python3 -m accel_models.cli check --backend cuda --quick --ops argmax,paged_attention,decoder_layer_decode,moe_decoder_layer_decode --no-models > $O/kit.txt 2>&1
echo "kit rc $?"; tail -8 $O/kit.txt
# (added in session 16) the kit's device-graph check: CUDA graphs replay tiny Llama/Mixtral with the eager tokens
timeout 120 python3 -c "
import torch
from accel_models.testing.models import check_graphs
for m in ('llama', 'mixtral'): print('graphs', check_graphs(m, 'cuda', dtype=torch.bfloat16, device='cuda'))
" > $O/kit-graphs.txt 2>&1; echo "kit graphs rc $?"; grep graphs $O/kit-graphs.txt
# (added in session 17) DeepSeek on the GPU for the first time: the kit's tiny V2 (expanded MLA cache) and V3
# (latent cache: one 64-channel key head; grouped sigmoid routing with the correction bias) vs float64
timeout 120 python3 -c "
import torch
from accel_models.testing.models import check_model
for m in ('deepseek_v2', 'deepseek_v3'):
    for dt in (torch.float32, torch.bfloat16): print('kit', check_model(m, 'cuda', dtype=dt, device='cuda'))
" > $O/kit-deepseek.txt 2>&1; echo "kit deepseek rc $?"; grep kit $O/kit-deepseek.txt; tail -3 $O/kit-deepseek.txt
python3 - <<'PY'
import json, os
import accel_backend_cuda._triton_kernels as k
O = os.environ["OUT"]; ra = dict(k.CONFIG["rows_attention"])
for n, over in {"pipe2t128": dict(pipe_stages=2, TILE_N=128), "pipe2t64": dict(pipe_stages=2),
                "pipe3t64": dict(pipe_stages=3)}.items():
    json.dump({"rows_attention": {**ra, **over}}, open(f"{O}/{n}.json", "w"))
PY
for v in default pipe2t128 pipe2t64 pipe3t64; do
  kc=""; [ $v != default ] && kc="--kernel-config $O/$v.json"
  timeout 60 python3 bench/cuda/bench_decode.py --models llama-1b --batches 64 --hf-batches "" --compiled-batches "" --gen 32 $kc --out $O/e2e-$v > $O/e2e.log.$v 2>&1; echo "e2e $v rc $?"; grep -E "^\| (llama|mixtral)" $O/e2e.log.$v
  cat $O/e2e.log.$v >> $O/e2e-ab.log; rm -rf $O/e2e-$v $O/e2e.log.$v $O/$v.json
done
rm -rf $O/attn
