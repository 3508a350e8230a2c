#!/bin/bash
# session 14 call 4: final figures at the committed defaults: kit, attention micro (defaults vs no prefetch), e2e
set -o pipefail
O=$OUT
(timeout 170 python3 -m accel_models.cli check --backend cuda --quick --ops argmax,paged_attention,linear,fused_experts,decoder_layer_decode,moe_decoder_layer_decode --no-models 2>&1 | tail -14) > $O/kit.log; echo "kit rc $?"; tail -9 $O/kit.log
timeout 80 python3 bench/cuda/bench_small_m.py --out $O/attn --sections attn --head-sizes 64 > $O/attn.log 2>&1; echo "attn rc $?"; grep -E "attn d=64 b=(16|64)" $O/attn.log
timeout 330 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 1,16,64 --hf-batches 1 --compiled-batches 1 --gen 64 --out $O/e2e > $O/e2e.log 2>&1; echo "e2e rc $?"; grep -E "^\| (llama|mixtral)|^\| model" $O/e2e.log
