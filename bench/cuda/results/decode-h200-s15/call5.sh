#!/bin/bash
# For the next session (written in session 15, not yet run): the final table after the kit (call3) and the A/Bs.
O=$OUT
timeout 290 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 1,16,64 --hf-batches 1 --compiled-batches 1 --gen 64 --out $O/e2e > $O/e2e.log 2>&1
echo "final rc $?"; grep -E "^\| (llama|mixtral)|copy" $O/e2e.log
