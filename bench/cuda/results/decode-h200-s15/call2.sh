#!/bin/bash
# Session 15, call 2: (1) decode attention with split-K forced at batch 16-64 (micro sweep, head size 64);
# (2) end to end, Llama-1B: gate_up + SiLU in one launch (GLU epilogue, default on in the rows path) against
# off, the rows hook below min_programs (layer_below: paged attention ops + the GLU MLP) at batch 16, the best
# batch-64 paged variant inside the hook, and splits in the fused rotary + attention items.
O=$OUT
timeout 200 python3 bench/cuda/bench_small_m.py --sections attn --sweep --head-sizes 64 --attn-batches 16,32,64 --out $O/attn > $O/attn.log 2>&1
echo "sweep rc $?"; grep -E "b=64|b=32" $O/attn.log | head -90
python3 - <<'PY'
import json, os, re
O = os.environ["OUT"]
import accel_backend_cuda._triton_kernels as k
rows = json.load(open(f"{O}/attn/results.json"))["attn"]["rows"]
b64 = [r for r in rows if r["batch"] == 64 and r["us"] == r["us"]]
best = min(b64, key=lambda r: r["us"])
print("best b64", best)
base = dict(k.CONFIG["attn_decode"]); ra = dict(k.CONFIG["rows_attention"])
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
cfgs = {
    "noglu": {"glu": {"enabled": 0}},
    "below": {"rows_attention": {**ra, "layer_below": 1}},
    "belownoglu": {"rows_attention": {**ra, "layer_below": 1}, "glu": {"enabled": 0}},
    "glus2": {"glu": {"wide": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "SPLIT_K": 2}}},
    "pagedbest": {"rows_attention": {**ra, "min_programs": 1e9, "layer_below": 1}, "attn_decode": {**base, **v}},
    "rowss2": {"rows_attention": {**ra, "split_below": 8, "split_target": 4}},
}
os.makedirs(f"{O}/cfg", exist_ok=True)
for n, c in cfgs.items():
    json.dump(c, open(f"{O}/cfg/{n}.json", "w"))
PY
run() {  # name batches timeout
  kc=""; [ $1 != default ] && kc="--kernel-config $O/cfg/$1.json"
  timeout $3 python3 bench/cuda/bench_decode.py --models llama-1b --batches $2 --hf-batches "" --compiled-batches "" --gen 32 $kc --out $O/e2e-$1 > $O/e2e-$1.log 2>&1; echo "e2e $1 rc $?"; grep -E "^\| (llama|mixtral)|Error|error" $O/e2e-$1.log | head -5
  cat $O/e2e-$1.log >> $O/e2e.log; rm -rf $O/e2e-$1 $O/e2e-$1.log
}
run default 16,64 110
run noglu 64 60
run below 16 50
run belownoglu 16 50
run glus2 64 60
run pagedbest 64 60
run rowss2 64 60
rm -rf $O/attn $O/cfg
