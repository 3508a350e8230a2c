#!/bin/bash
O=$OUT
echo '{"rows_attention": {"enabled": 0}, "attn_decode": {"BLOCK_M": 16, "TILE_N": 128, "num_warps": 4, "num_stages": 2, "split_keys": 64, "split_below": 0.5, "split_target": 4, "prefetch_below": 1.0, "prefetch_elems": 8192, "prefetch_warps": 8, "prefetch_stages": 1, "prefetch_splits": 0}}' > $O/paged128.json
echo '{"rows_attention": {"enabled": 1, "min_programs": 1.0, "TILE_N": 128, "num_warps": 4, "split_below": 1.0, "split_target": 2, "max_splits": 16}}' > $O/rows128.json
for v in default paged128 rows128; do
  kc=""; [ $v != default ] && kc="--kernel-config $O/$v.json"
  timeout 75 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 64 --hf-batches "" --compiled-batches "" --gen 32 $kc --out $O/e2e-$v > $O/e2e-$v.log 2>&1; echo "e2e $v rc $?"; grep -E "^\| (llama|mixtral)" $O/e2e-$v.log
done
