"""Decode-sized kernels of the CUDA backend (issue 11): check, then time against cuBLAS / the old plan.

    python bench/cuda/bench_small_m.py --out DIR [--sections verify,attn,linear] [--sweep [--wide]]
                                       [--ms 1,16,64] [--shapes qkv_proj,down_proj] [--head-sizes 64,128]

* ``verify``  the small-M linear kernel (bf16 and float32, odd shapes, splits, bias, strided weight rows;
              in a CUDA graph replayed 20 times: the split counters must reset) and decode attention
              through the split-K paths (fused merge and second-kernel merge) against float64.
* ``attn``    decode paged attention with 32/8 heads, block 16, head size 128 (Llama-8B's; ``--head-sizes 64``
              is Llama-1B's), batch 1/4/16/64, contexts 129-248 (the benchmark's), graph-captured with
              max_seq_len 256 as the runtime does: the default plan against the old one (split only above
              256 keys), the merge kernel and the loop without prefetch; ``--sweep``: split-K chunk sizes,
              merges, tiles, warps and stages with and without the prefetching loop.
* ``linear``  the Llama-1B decode projections and LM head at M = 1, 16, 64: cuBLAS (F.linear) against a
              sweep of the small-M kernel's configs. Weights rotate over copies > 100 MB so L2 does not
              serve them; each time is a CUDA graph of one call per copy, median of replays, per call.
              ``--wide`` sweeps the wider tiles tried for 17-64 rows instead (session 10: none beat cuBLAS).

Writes DIR/results.json and prints tables last.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
RES: dict = {"failures": []}
DEV = "cuda"
SWEEP = False  # --sweep: the config sweeps that chose the defaults (first H100 run of issue 11)
WIDE = False  # --wide: sweep the wider tiles for 17-64 rows instead (session 10)
HEAD_SIZES: tuple[int, ...] = (128,)  # --head-sizes: the attention section's head sizes
ATTN_BATCHES: tuple[int, ...] = (1, 4, 16, 64)  # --attn-batches: its batch sizes
MS: tuple[int, ...] = ()  # --ms: the row counts of the linear section (default 1, 16; with --sweep 1, 16, 64)
SHAPE_NAMES: tuple[str, ...] = ()  # --shapes: a subset of SHAPES


def log(*a) -> None:
    print(*a, flush=True)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-300))


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per replay of a CUDA graph of fn (median of reps, after 3 warm replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del g
    return sorted(ts)[len(ts) // 2]


def copy_bw() -> float:
    """The floor's bandwidth: bench_decode.py's (read + write of a 1 GiB copy, event-timed, median), so
    every script's floor uses one figure. (A graph-timed copy here read 2.72 TB/s on the H200 where that
    one reads 4.1-4.2: session 12's bench_moe_decode floors were 1.5x too long.)"""
    from bench_decode import copy_bandwidth

    return copy_bandwidth()


# ----------------------------------------------------------------------------------------------------


def section_verify(C, K) -> dict:
    g = torch.Generator().manual_seed(0)
    rows = []
    tol = {torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
    cases = [(1, 2048, 2048), (1, 3072, 2048), (3, 1000, 777), (7, 130, 8192), (16, 2048, 8192), (16, 4099, 2048),
             (1, 32000, 2048), (5, 64, 40), (12, 1, 300)]
    for dtype, (m, n, k), bias in itertools.product([torch.bfloat16, torch.float32], cases, [False, True]):
        x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
        w = (torch.randn(n, k + 8, generator=g) / math.sqrt(k)).to(dtype).to(DEV)[:, :k]  # strided rows
        b = torch.randn(n, generator=g).to(dtype).to(DEV) if bias else None
        ref = x.double() @ w.double().T + (b.double() if bias else 0)
        y = C.accel_linear(x=x, weight=w, bias=b, prepared=None)
        plan = C.linear_plan(m, n, k, C._num_sms(x.device), K.CONFIG)
        e = rel(y, ref)
        ok = e < tol[dtype] * max(1.0, math.sqrt(k) / 32) and bool(torch.isfinite(y).all())
        # the cuBLAS reference in the same dtype, for context
        e_cublas = rel(F.linear(x, w, b), ref)
        rows.append({"dtype": str(dtype), "m": m, "n": n, "k": k, "bias": bias, "plan": plan, "rel_err": e,
                     "cublas_rel_err": e_cublas, "ok": ok})
        if not ok:
            RES["failures"].append(f"linear {dtype} {m}x{n}x{k} bias={bias}: rel err {e:.3g}")
    # every config family the sweep times, forced splits, on one odd shape
    x = torch.randn(9, 1500, generator=g).to(torch.bfloat16).to(DEV)
    w = torch.randn(700, 1500, generator=g).to(torch.bfloat16).to(DEV)
    b = torch.randn(700, generator=g).to(torch.bfloat16).to(DEV)
    ref = x.double() @ w.double().T + b.double()
    for dot, bn, bk, split in itertools.product([0, 1], [16, 32], [128, 256], [1, 3, 8]):
        bm = 16 if dot else 16
        y = K.linear_small_m(x, w, b, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, USE_DOT=dot,
                                           num_warps=4, num_stages=3))
        e = rel(y, ref)
        if not e < 1.6e-2:
            RES["failures"].append(f"linear forced cfg dot={dot} bn={bn} bk={bk} split={split}: {e:.3g}")
        rows.append({"forced": [dot, bn, bk, split], "rel_err": e})
    # graph replays: the counters must be zero again after every launch
    x = torch.randn(1, 2048, generator=g).to(torch.bfloat16).to(DEV)
    w = torch.randn(2048, 8192, generator=g).to(torch.bfloat16).to(DEV)
    xs = torch.randn(1, 8192, generator=g).to(torch.bfloat16).to(DEV)
    outs = {}

    def step():
        outs["y"] = C.accel_linear(x=xs, weight=w, bias=None, prepared=None)

    step()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        step()
    good = True
    for _ in range(10):
        xs.copy_(torch.randn(1, 8192, generator=g).to(torch.bfloat16).to(DEV))
        gr.replay()
        torch.cuda.synchronize()
        good = good and rel(outs["y"], xs.double() @ w.double().T) < 1.6e-2
    gr.replay()
    a = outs["y"].clone()
    gr.replay()
    good = good and torch.equal(a, outs["y"])  # deterministic
    zero = all(int(c.abs().sum()) == 0 for c in K._COUNTERS.values())
    if not (good and zero):
        RES["failures"].append(f"linear under graph replays: correct+deterministic={good} counters zero={zero}")
    del gr

    return {"linear": rows}


def section_verify_attn(C, K) -> dict:
    # decode attention through the split paths
    att = []
    ops_ref = importlib.import_module("accel_backend_reference")
    for batch, lens, fused in itertools.product([1, 2, 3, 16, 64], ["short", "long"], [True, False]):
        K.FUSED_MERGE = fused
        gen = torch.Generator().manual_seed(batch)
        seq = (torch.randint(129, 249, (batch,), generator=gen) if lens == "short"
               else torch.randint(1000, 5000, (batch,), generator=gen)).tolist()
        e = attention_check(C, ops_ref, seq, gen, max_seq_len=256 if lens == "short" else 8192)
        att.append({"batch": batch, "lens": lens, "fused": fused, "rel_err": e})
        if not e < 1.6e-2:
            RES["failures"].append(f"attention b={batch} {lens} fused={fused}: {e:.3g}")
    K.FUSED_MERGE = True
    zero = all(int(c.abs().sum()) == 0 for c in K._COUNTERS.values())
    if not zero:
        RES["failures"].append("attention left a split counter non-zero")
    return {"attention": att}


def build_cache(C, seq, gen, heads=32, kv_heads=8, d=128, bs=16, dtype=torch.bfloat16, copies=1):
    batch = len(seq)
    nblk = [math.ceil(s / bs) for s in seq]
    total = sum(nblk) + 1
    perm = torch.randperm(total, generator=gen)
    bt = torch.zeros(batch, max(nblk) + 1, dtype=torch.int32)
    i = 0
    for b_, n in enumerate(nblk):
        bt[b_, :n] = perm[i: i + n]
        i += n
    caches = []
    for _ in range(copies):
        c = C.accel_allocate_kv_cache(num_blocks=total, block_size=bs, num_kv_heads=kv_heads, head_size=d,
                                      dtype=dtype, device=torch.device(DEV))
        c.normal_()
        caches.append(c)
    meta = dict(block_table=bt.to(DEV), seq_lens=torch.tensor(seq, dtype=torch.int32, device=DEV),
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=DEV), max_query_len=1)
    return caches, meta


def attention_check(C, R, seq, gen, max_seq_len):
    heads, kv_heads, d, bs = 32, 8, 128, 16
    caches, meta = build_cache(C, seq, gen)
    cache = caches[0]
    q = torch.randn(len(seq), heads, d, generator=gen).to(torch.bfloat16).to(DEV)
    out = C.accel_paged_attention(query=q, kv_cache=cache, **meta, max_seq_len=max_seq_len, scale=d**-0.5,
                                  sliding_window=None, logits_soft_cap=None)
    # float64 reference from the cache's [2, blocks, kv_heads, bs, d] layout
    kv = cache.double()
    bt = meta["block_table"].long()
    ref = torch.empty(len(seq), heads, d, dtype=torch.float64, device=DEV)
    for b_, s in enumerate(seq):
        pos = torch.arange(s, device=DEV)
        blk = bt[b_, pos // bs]
        k = kv[0, blk, :, pos % bs]  # [s, kv_heads, d]
        v = kv[1, blk, :, pos % bs]
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        sc = torch.einsum("hd,shd->hs", q[b_].double(), k) * d**-0.5
        ref[b_] = torch.einsum("hs,shd->hd", sc.softmax(-1), v)
    return rel(out, ref)


# ----------------------------------------------------------------------------------------------------


def section_attn(C, K, bw: float) -> dict:
    rows = []
    heads, kv_heads = 32, 8
    base = dict(K.CONFIG["attn_decode"])
    variants = {
        "old (split above 256 keys)": dict(split_keys=256, split_below=2),
        "default (CONFIG)": dict(),
        "default, merge kernel": dict(_fused=False),
        "default, no prefetch": dict(prefetch_below=0),
    } if not SWEEP else {
        "old (split above 256 keys), no prefetch": dict(split_keys=256, split_below=2, prefetch_below=0),
        "split 64 fused, no prefetch": dict(split_keys=64, prefetch_below=0),
        "split 64 two-kernel, no prefetch": dict(split_keys=64, _fused=False, prefetch_below=0),
        "split 64, 3 stages, no prefetch": dict(split_keys=64, num_stages=3, prefetch_below=0),
        "default (CONFIG)": dict(),
        # session 14: the hand-pipelined decode loop (next tile's keys/values in flight) everywhere
        **{f"prefetch {el} elems w{nw} s{st}": dict(prefetch_below=1e9, prefetch_splits=1, prefetch_elems=el,
                                                       prefetch_warps=nw, prefetch_stages=st)
           for el, nw, st in ((2048, 4, 1), (4096, 4, 1), (4096, 4, 2), (4096, 8, 1), (8192, 4, 1), (8192, 8, 1),
                              (8192, 8, 2))},
        # the plain loop's tiles, warps and stages (no prefetch; session 14's ncu: batch 64 at 0.55 waves)
        **{f"plain TILE_N {tn} w{nw} s{st}": dict(prefetch_below=0, TILE_N=tn, split_keys=max(64, tn), num_warps=nw,
                                                    num_stages=st)
           for tn, nw, st in ((32, 4, 3), (64, 2, 2), (64, 8, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (256, 8, 1),
                              (256, 8, 2))},
        # session 15: split-K forced where the programs already fill the SMs (split_target x SMs programs:
        # at batch 64 x 8 KV heads, 4 / 8 / 12 give 2 / 3 / 4 splits), plain and prefetching loops
        **{f"plain TILE_N {tn} w{nw} s{st} split target {tg}": dict(prefetch_below=0, TILE_N=tn, split_keys=tn,
                                                                    num_warps=nw, num_stages=st, split_below=1e9,
                                                                    split_target=tg)
           for tn, nw, st, tg in ((64, 4, 2, 4), (64, 4, 2, 8), (64, 4, 2, 12), (64, 4, 1, 8), (128, 4, 2, 4),
                                  (128, 4, 1, 4), (128, 8, 1, 4), (32, 4, 2, 8), (32, 4, 2, 12))},
        **{f"prefetch {el} elems w{nw} split target {tg}": dict(prefetch_below=1e9, prefetch_splits=1, prefetch_elems=el,
                                                                prefetch_warps=nw, prefetch_stages=1, split_below=1e9,
                                                                split_keys=el // 64, split_target=tg)
           for el, nw, tg in ((4096, 4, 4), (4096, 4, 8), (8192, 8, 4))},
    }
    for d, batch in itertools.product(HEAD_SIZES, ATTN_BATCHES):
        gen = torch.Generator().manual_seed(batch)
        seq = torch.randint(129, 249, (batch,), generator=gen).tolist()
        kv_bytes = sum(seq) * kv_heads * d * 2 * 2
        copies = max(1, min(16, math.ceil(200e6 / max(kv_bytes * 1.0, 1))))
        caches, meta = build_cache(C, seq, gen, d=d, copies=copies)
        q = torch.randn(batch, heads, d, generator=gen).to(torch.bfloat16).to(DEV)
        for name, v in variants.items():
            v = dict(v)
            K.FUSED_MERGE = v.pop("_fused", True)
            K.CONFIG["attn_decode"] = {**base, **v}
            plan = C.attention_plan(num_tokens=batch, num_seqs=batch, num_heads=heads, num_kv_heads=kv_heads,
                                    head_size=d, max_query_len=1, max_seq_len=256, num_sms=C._num_sms(q.device),
                                    config=K.CONFIG)

            def run():
                for c in caches:
                    C.accel_paged_attention(query=q, kv_cache=c, **meta, max_seq_len=256, scale=d**-0.5,
                                            sliding_window=None, logits_soft_cap=None)
            try:
                t = graph_time(run) / len(caches)
            except Exception as exc:
                t = float("nan")
                RES["failures"].append(f"attn {name} b={batch}: {type(exc).__name__}: {exc}")
            floor = kv_bytes / bw
            rows.append({"head_size": d, "batch": batch, "variant": name, "us": t * 1e6, "floor_us": floor * 1e6,
                         "x_floor": t / floor, "splits": plan.num_splits, "tile_n": plan.tile_n})
            log(f"  attn d={d} b={batch:2d} {name:40s} {t * 1e6:7.2f} us  ({t / floor:5.2f}x floor, "
                f"splits {plan.num_splits})")
        del caches
    K.CONFIG["attn_decode"] = base
    K.FUSED_MERGE = True
    return {"rows": rows}


SHAPES = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048),
          "down_proj": (2048, 8192), "lm_head": (128256, 2048)}


def section_linear(C, K, bw: float, quick: bool) -> dict:
    rows = []
    sms = C._num_sms(torch.device(DEV))
    for name, (n, k) in SHAPES.items():
        if SHAPE_NAMES and name not in SHAPE_NAMES:
            continue
        wbytes = n * k * 2
        copies = max(2, min(16, math.ceil(200e6 / wbytes)))
        ws = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / 45 for _ in range(copies)]
        for m in (MS or ((1, 16, 64) if SWEEP else (1, 16))):
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            floor = (wbytes + m * (n + k) * 2) / bw
            t_cub = graph_time(lambda: [F.linear(x, w) for w in ws]) / copies
            res = {"shape": name, "n": n, "k": k, "m": m, "floor_us": floor * 1e6, "cublas_us": t_cub * 1e6,
                   "configs": []}
            ref = x.double() @ ws[0].double().T
            if m == 1:
                fams = [(dot, bn, bk, nw, st) for dot, bn, bk, nw, st in
                        itertools.product([0, 1], [16, 32], [256, 512], [4, 8], [2, 4])
                        if dot or bn * bk <= 8192 * (nw // 4)]
            elif m == 16:
                fams = list(itertools.product([1], [16, 32, 64], [128, 256], [4], [3, 4]))
            elif not WIDE:
                fams = list(itertools.product([1], [16, 32, 64], [64, 128], [4], [3, 4]))
            else:  # --wide: the tiles for 17-64 rows (x re-read BLOCK_M / BLOCK_N times the weight's bytes)
                fams = [(1, bn, bk, nw, 3) for bn in (64, 128) for bk in (64, 128) for nw in (4, 8)]
                fams += [(1, 128, 64, 8, 4), (1, 64, 64, 4, 4), (1, 256, 64, 8, 3)]
            if quick or not SWEEP:
                fams = []
            for dot, bn, bk, nw, st in fams:
                tiles = -(-n // bn)
                for split in ((1, 2, 4, 8) if WIDE else (1, 2, 4, 8, 16)):
                    if split > 1 and (k // split < bk or tiles * split > 32 * sms):
                        continue
                    cfg = dict(BLOCK_M=max(16, C._pow2(m)) if dot else m, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                               USE_DOT=dot, num_warps=nw, num_stages=st)
                    try:
                        y = K.linear_small_m(x, ws[0], None, cfg)
                        e = rel(y, ref)
                        if not e < 1.6e-2:
                            RES["failures"].append(f"linear {name} m={m} {cfg}: rel err {e:.3g}")
                            continue
                        t = graph_time(lambda: [K.linear_small_m(x, w, None, cfg) for w in ws]) / copies
                    except Exception as exc:
                        res["configs"].append({"cfg": cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                        continue
                    res["configs"].append({"cfg": cfg, "us": t * 1e6, "programs": tiles * split})
            ok = [c for c in res["configs"] if "us" in c]
            ok.sort(key=lambda c: c["us"])
            res["best"] = ok[:5]
            # the plan the backend would use today
            plan = C.linear_plan(m, n, k, sms, K.CONFIG)
            if plan is None:  # below min_bytes / above max_m: what the small-M kernel would do there
                lin = {**C.LINEAR_CONFIG, **(K.CONFIG.get("linear") or {}), "min_bytes": 0, "max_m": 64}
                plan = C.linear_plan(m, n, k, sms, {"linear": lin})
                res["plan_is_cublas"] = True
            if plan is not None:
                res["plan"] = plan
                res["plan_us"] = graph_time(lambda: [K.linear_small_m(x, w, None, plan) for w in ws]) / copies * 1e6
            rows.append(res)
            b = ok[0] if ok else None
            res["cublas_us_again"] = graph_time(lambda: [F.linear(x, w) for w in ws]) / copies * 1e6
            log(f"  {name:13s} m={m:2d} floor {floor * 1e6:7.1f} us  cuBLAS {t_cub * 1e6:7.1f} us"
                + (f"  best {b['us']:7.1f} us {b['cfg']}" if b else "")
                + (f"  {'small-M' if res.get('plan_is_cublas') else 'plan'} {res['plan_us']:7.1f} us {res['plan']}"
                   if "plan_us" in res else "")
                + f"  cuBLAS again {res['cublas_us_again']:7.1f}")
        del ws
    return {"rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sections", default="verify,verify_attn,attn,linear")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="sweep attention variants and linear configs")
    ap.add_argument("--wide", action="store_true", help="with --sweep: the wide tiles for 17-64 rows")
    ap.add_argument("--head-sizes", default="128", help="head sizes of the attention section, e.g. 64,128")
    ap.add_argument("--attn-batches", default="1,4,16,64", help="batch sizes of the attention section")
    ap.add_argument("--ms", default="", help="row counts of the linear section, e.g. 32,64")
    ap.add_argument("--shapes", default="", help="a subset of the linear shapes, e.g. qkv_proj,down_proj")
    args = ap.parse_args()
    global SWEEP, WIDE, MS, SHAPE_NAMES, HEAD_SIZES, ATTN_BATCHES
    SWEEP, WIDE = args.sweep, args.wide
    try:
        MS = tuple(int(v) for v in args.ms.split(",") if v)
    except ValueError:
        ap.error(f"--ms takes comma-separated row counts, e.g. 32,64; got {args.ms!r}")
    if any(m < 1 for m in MS):
        ap.error(f"--ms row counts must be positive; got {args.ms!r}")
    SHAPE_NAMES = tuple(v for v in args.shapes.split(",") if v)
    try:
        HEAD_SIZES = tuple(int(v) for v in args.head_sizes.split(",") if v)
    except ValueError:
        ap.error(f"--head-sizes takes comma-separated sizes, e.g. 64,128; got {args.head_sizes!r}")
    if not HEAD_SIZES or any(h < 16 or h & (h - 1) for h in HEAD_SIZES):
        ap.error(f"--head-sizes: powers of two from 16; got {args.head_sizes!r}")
    try:
        ATTN_BATCHES = tuple(int(v) for v in args.attn_batches.split(",") if v)
    except ValueError:
        ap.error(f"--attn-batches takes comma-separated batch sizes, e.g. 16,64; got {args.attn_batches!r}")
    if not ATTN_BATCHES or min(ATTN_BATCHES) < 1:
        ap.error(f"--attn-batches: positive batch sizes; got {args.attn_batches!r}")
    unknown = sorted(set(SHAPE_NAMES) - set(SHAPES))
    if unknown:  # a misspelt shape would otherwise measure nothing and report no failure
        ap.error(f"--shapes: unknown {', '.join(unknown)}; the shapes are {', '.join(SHAPES)}")
    if WIDE and not SWEEP:
        ap.error("--wide selects the tiles --sweep measures: pass --sweep too")
    args.out.mkdir(parents=True, exist_ok=True)
    C = importlib.import_module("accel_backend_cuda")
    K = importlib.import_module("accel_backend_cuda._triton_kernels")
    RES["env"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "triton": importlib.import_module("triton").__version__}
    bw = copy_bw()
    RES["copy_bw"] = bw
    log(f"{RES['env']}  copy bandwidth {bw / 1e12:.2f} TB/s")
    for sec in args.sections.split(","):
        t0 = time.time()
        try:
            if sec == "verify":
                RES[sec] = section_verify(C, K)
            elif sec == "verify_attn":
                RES[sec] = section_verify_attn(C, K)
            elif sec == "attn":
                RES[sec] = section_attn(C, K, bw)
            elif sec == "linear":
                RES[sec] = section_linear(C, K, bw, args.quick)
        except Exception:
            RES["failures"].append(f"{sec}: {traceback.format_exc()[-1500:]}")
        log(f"[{sec}] {time.time() - t0:.1f}s")
        (args.out / "results.json").write_text(json.dumps(RES, indent=1, default=str))
    log("\n  ".join(["FAILURES:" if RES["failures"] else "no failures", *RES["failures"]]))
    return 1 if RES["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
