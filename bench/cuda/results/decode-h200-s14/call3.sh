#!/bin/bash
# session 14 call 3: decode layers of 2+ tokens with rotary + attention in one launch (decoder_layer_rows): kit, e2e A/B
set -o pipefail
O=$OUT
echo '{"rows_attention": {"enabled": 0}}' > $O/rows-off.json
echo '{"rows_attention": {"enabled": 1, "TILE_N": 32, "num_warps": 4, "split_below": 1.0, "split_target": 2, "max_splits": 16}}' > $O/rows-t32.json
echo '{"rows_attention": {"enabled": 1, "TILE_N": 64, "num_warps": 4, "split_below": 0, "split_target": 2, "max_splits": 16}}' > $O/rows-nosplit.json
(timeout 170 python3 -m accel_models.cli check --backend cuda --quick --ops paged_attention,decoder_layer_decode,moe_decoder_layer_decode --no-models 2>&1 | tail -12) > $O/kit.log; echo "kit rc $?"; tail -6 $O/kit.log
for v in default rows-off rows-t32 rows-nosplit; do
  kc=""; [ $v != default ] && kc="--kernel-config $O/$v.json"
  timeout 130 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 16,64 --hf-batches "" --compiled-batches "" --gen 48 $kc --out $O/e2e-$v > $O/e2e-$v.log 2>&1; echo "e2e $v rc $?"; grep -E "^\| (llama|mixtral)" $O/e2e-$v.log
done
