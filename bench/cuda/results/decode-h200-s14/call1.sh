#!/bin/bash
# session 14 call 1: prefetching decode attention: GPU check, sweep, end to end A/B, fresh profile
set -o pipefail
O=$OUT
echo '{"attn_decode": {"BLOCK_M": 16, "TILE_N": 64, "num_warps": 4, "num_stages": 2, "split_keys": 64, "split_below": 0.5, "split_target": 4, "prefetch": 0}}' > $O/no-prefetch.json
# (kit check in a later call: verify_attn below checks the kernel in bf16 against float64)
timeout 200 python3 bench/cuda/bench_small_m.py --out $O/attn --sections verify_attn,attn --sweep --head-sizes 64,128 > $O/attn.log 2>&1; echo "attn rc $?"
grep -E "attn d=64 b=(16|64)|attn d=128 b=64|FAIL|no failures" $O/attn.log | head -60
timeout 170 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 16,64 --hf-batches "" --compiled-batches "" --gen 48 --out $O/e2e-prefetch > $O/e2e-prefetch.log 2>&1; echo "e2e1 rc $?"; tail -12 $O/e2e-prefetch.log
timeout 170 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 16,64 --hf-batches "" --compiled-batches "" --gen 48 --kernel-config $O/no-prefetch.json --out $O/e2e-noprefetch > $O/e2e-noprefetch.log 2>&1; echo "e2e2 rc $?"; tail -12 $O/e2e-noprefetch.log
