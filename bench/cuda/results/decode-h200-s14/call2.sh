#!/bin/bash
# session 14 call 2: prefetch rule (b16 only) + first weight tile before the PDL wait: GPU check, micro, e2e A/B
set -o pipefail
O=$OUT
echo '{"linear": {"w_early": 0}}' > $O/w-late.json
echo '{"linear": {"min_bytes": 0}}' > $O/qkvo-small-m.json
(timeout 150 python3 -m accel_models.cli check --backend cuda --quick --ops paged_attention,linear,act_and_mul_linear --no-models 2>&1 | tail -12) > $O/kit.log; echo "kit rc $?"; tail -6 $O/kit.log
timeout 150 python3 bench/cuda/bench_small_m.py --out $O/micro --sections verify,verify_attn,attn,linear --ms 1,16 --head-sizes 64 > $O/micro.log 2>&1; echo "micro rc $?"
grep -E "attn d=64 b=(16|64)|m= ?1|m=16|FAIL|no failures" $O/micro.log | head -40
for v in default w-late qkvo-small-m; do
  kc=""; [ $v != default ] && kc="--kernel-config $O/$v.json"
  timeout 150 python3 bench/cuda/bench_decode.py --models llama-1b,mixtral-small --batches 1,16 --hf-batches "" --compiled-batches "" --gen 48 $kc --out $O/e2e-$v > $O/e2e-$v.log 2>&1; echo "e2e $v rc $?"; grep -E "^\| (llama|mixtral)" $O/e2e-$v.log
done
