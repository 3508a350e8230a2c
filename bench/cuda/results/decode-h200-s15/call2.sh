#!/bin/bash
# Session 15, call 2: decode attention with split-K forced at batch 16-64 (micro sweep, head size 64), then the
# best batch-64 paged variant end to end (layer op by op) against the fused rotary + attention items, with and
# without splits in those items.
O=$OUT
timeout 240 python3 bench/cuda/bench_small_m.py --sections attn --sweep --head-sizes 64 --attn-batches 16,32,64 --out $O/attn > $O/attn.log 2>&1
echo "sweep rc $?"; grep -E "b=64|b=32" $O/attn.log | sort -t'(' -k1 | head -80
python3 - <<'PY'
import json, os, re
O = os.environ["OUT"]
import accel_backend_cuda._triton_kernels as k
rows = json.load(open(f"{O}/attn/results.json"))["attn"]["rows"]
b64 = [r for r in rows if r["batch"] == 64 and r["us"] == r["us"]]
best = min(b64, key=lambda r: r["us"])
print("best b64", best)
base = dict(k.CONFIG["attn_decode"]); rows_cfg = dict(k.CONFIG["rows_attention"])
# the variant's config, from its name (bench_small_m's sweep table)
name = best["variant"]; v = {}
mt = re.match(r"plain TILE_N (\d+) w(\d+) s(\d+)(?: split target (\d+))?", name)
mp = re.match(r"prefetch (\d+) elems w(\d+)(?: s(\d+))?(?: split target (\d+))?", name)
if mt:
    tn, nw, st, tg = mt.groups(); v = dict(prefetch_below=0, TILE_N=int(tn), split_keys=int(tn) if tg else max(64, int(tn)), num_warps=int(nw), num_stages=int(st))
    if tg: v.update(split_below=1e9, split_target=int(tg))
elif mp:
    el, nw, st, tg = mp.groups(); v = dict(prefetch_below=1e9, prefetch_splits=1, prefetch_elems=int(el), prefetch_warps=int(nw), prefetch_stages=int(st or 1))
    if tg: v.update(split_below=1e9, split_keys=int(el) // 64, split_target=int(tg))
print("paged-best variant", v)
json.dump({"rows_attention": {**rows_cfg, "enabled": 0}, "attn_decode": {**base, **v}}, open(f"{O}/pagedbest.json", "w"))
json.dump({"rows_attention": {**rows_cfg, "split_below": 8, "split_target": 4}}, open(f"{O}/rowss2.json", "w"))
json.dump({"rows_attention": {**rows_cfg, "split_below": 8, "split_target": 8}}, open(f"{O}/rowss3.json", "w"))
PY
run() {  # name batches timeout
  kc=""; [ $1 != default ] && kc="--kernel-config $O/$1.json"
  timeout $3 python3 bench/cuda/bench_decode.py --models llama-1b --batches $2 --hf-batches "" --compiled-batches "" --gen 32 $kc --out $O/e2e-$1 > $O/e2e-$1.log 2>&1; echo "e2e $1 rc $?"; grep -E "^\| (llama|mixtral)" $O/e2e-$1.log
  rm -rf $O/e2e-$1
}
run default 64 100
run pagedbest 64 70
run rowss2 64 70
run rowss3 64 70
run default 64 70
rm -rf $O/attn
