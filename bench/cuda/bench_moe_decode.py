"""fused_experts at decode sizes on the GPU (issue 11): check the decode path, sweep its tiles, time it
against the sorted grouped GEMM, and write the chosen config.

    python bench/cuda/bench_moe_decode.py --out DIR [--quick] [--no-sweep] [--rows none,16,32] [--tokens 1,...,64]

* verify: the decode path (bf16, fp16, float32; silu and gelu; expert_map with -1 experts; odd shapes;
  1 to 128 pairs, both slot kinds) against the reference backend in float64 (fresh random inputs each case);
  inside a CUDA graph replayed with new routing (the split counters must reset; replays = eager, bitwise).
* sweep: the Mixtral-small layer (16 experts top-2, hidden 2048, intermediate 1024, bf16) at 1 and 8 tokens,
  gate/up tiles with the down tiles fixed, then down tiles with the best gate/up tiles (``--sweep-tokens``
  sets the token counts scored).
* compare: the best tiles (``--no-sweep``: the defaults) against the old path (``max_pairs`` 0) at 1-64
  tokens (``--tokens``), the decode path with each ``--rows`` dot tile side by side (``none``: all the
  launch's pairs in one masked tile, the path before session 12). Weights rotate over 6
  layer copies (1.2 GB, L2 never serves them); random routing per copy; a CUDA graph of one call per copy,
  median of replays, per call. Floor: the distinct routed experts' bytes over the copy bandwidth.

Writes DIR/results.json, DIR/best.json (a ``_triton_kernels.CONFIG`` override: the chosen tiles and the
largest pair count at which the decode path won; absent if any check failed) and prints tables last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "cuda"))
from bench_small_m import copy_bw, graph_time, rel  # noqa: E402

import accel_backend_cuda as C  # noqa: E402
import accel_backend_reference as R  # noqa: E402

K = importlib.import_module("accel_backend_cuda._triton_kernels")
DEV = "cuda"
RES: dict = {"failures": [], "verify": [], "sweep": [], "compare": []}
OLD = {"max_pairs": 0, "up": C.MOE_DECODE_CONFIG["up"], "down": C.MOE_DECODE_CONFIG["down"]}


def log(*a) -> None:
    print(*a, flush=True)


def routing(tokens: int, experts: int, top_k: int, gen: torch.Generator):
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(torch.int32)
    w = torch.rand(tokens, top_k, generator=gen) + 0.1
    return (w / w.sum(-1, keepdim=True)).to(DEV), ids.to(DEV)


def call(cfg, x, w13, w2, tw, ti, act="silu", emap=None):
    K.CONFIG["moe_decode"] = cfg
    return C.accel_fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=tw, topk_ids=ti, activation=act,
                                 expert_map=emap)


def verify(cfg: dict, quick: bool) -> None:
    cases = [  # tokens, experts, local (expert_map) or None, top_k, hidden, inter, dtype, act
        (1, 16, None, 2, 2048, 1024, torch.bfloat16, "silu"),
        (4, 16, None, 2, 2048, 1024, torch.bfloat16, "silu"),
        (8, 16, None, 2, 2048, 1024, torch.bfloat16, "silu"),
        (16, 16, None, 2, 2048, 1024, torch.bfloat16, "silu"),
        (64, 16, None, 2, 2048, 1024, torch.bfloat16, "silu"),
        (128, 16, None, 2, 2048, 1024, torch.bfloat16, "silu"),
        (60, 4, None, 2, 512, 256, torch.bfloat16, "silu"),  # ~30 pairs an expert: the chunk loop
        (50, 5, 3, 2, 300, 200, torch.float32, "gelu"),
        (3, 8, 5, 2, 1000, 700, torch.bfloat16, "gelu"),
        (5, 8, 3, 3, 520, 300, torch.float16, "silu"),
        (2, 6, None, 2, 300, 200, torch.float32, "silu"),
        (11, 6, 4, 2, 300, 200, torch.float32, "gelu"),
        (1, 64, None, 6, 1024, 512, torch.bfloat16, "silu"),
    ]
    if quick:
        cases = cases[:2]
    gen = torch.Generator().manual_seed(11)
    for tokens, experts, local, top_k, hidden, inter, dt, act in cases:
        nl = local or experts
        x = torch.randn(tokens, hidden, generator=gen).to(DEV, dt)
        w13 = (torch.randn(nl, 2 * inter, hidden, generator=gen) / hidden**0.5).to(DEV, dt)
        w2 = (torch.randn(nl, hidden, inter, generator=gen) / inter**0.5).to(DEV, dt)
        tw, ti = routing(tokens, experts, top_k, gen)
        emap = None
        if local:
            keep = torch.randperm(experts, generator=gen)[:local]
            emap = torch.full((experts,), -1, dtype=torch.int32)
            emap[keep] = torch.arange(local, dtype=torch.int32)
            emap = emap.to(DEV)
        ref = R.accel_fused_experts(hidden_states=x.double(), w13=w13.double(), w2=w2.double(), topk_weights=tw.double(),
                                    topk_ids=ti, activation=act, expert_map=emap)
        big = {**cfg, "max_pairs": 1 << 20}
        got = call(big, x, w13, w2, tw, ti, act, emap)
        masked = call({**big, "rows": None}, x, w13, w2, tw, ti, act, emap)  # one tile of all pairs
        old = call(OLD, x, w13, w2, tw, ti, act, emap)
        tol = 1e-5 if dt == torch.float32 else 1e-2
        r_new, r_masked, r_old = rel(got, ref), rel(masked, ref), rel(old, ref)
        ok = bool(torch.isfinite(got).all()) and r_new < tol and r_new < 2 * r_old + 1e-6 and r_masked < tol
        # graph: capture with this routing, replay with fresh routing copied into the static inputs
        plan = C.moe_decode_plan(ti.numel(), nl, hidden, inter, x.element_size(), {"moe_decode": big})
        K.CONFIG["moe_decode"] = big
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            C.accel_fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=tw, topk_ids=ti, activation=act,
                                  expert_map=emap)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            gout = C.accel_fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=tw, topk_ids=ti,
                                         activation=act, expert_map=emap)
        same = True
        for _ in range(3):
            tw2, ti2 = routing(tokens, experts, top_k, gen)
            tw.copy_(tw2)
            ti.copy_(ti2)
            x.copy_(torch.randn(tokens, hidden, generator=gen).to(DEV, dt))
            g.replay()
            eager = C.accel_fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=tw, topk_ids=ti,
                                          activation=act, expert_map=emap)
            torch.cuda.synchronize()
            same &= bool(torch.equal(gout, eager))  # the top-k sum runs in choice order: deterministic
        ok &= same
        row = dict(tokens=tokens, experts=experts, local=local, top_k=top_k, hidden=hidden, inter=inter, dtype=str(dt),
                   act=act, rel_new=r_new, rel_masked=r_masked, rel_old=r_old, graph_eq=same, by_expert=plan["BY_EXPERT"], ok=ok)
        RES["verify"].append(row)
        log("verify", row)
        if not ok:
            RES["failures"].append(row)
        del g


class Layer:
    """Mixtral-small fused_experts inputs: ``copies`` layers of weights, a routing per copy."""

    def __init__(self, copies=6, experts=16, hidden=2048, inter=1024, top_k=2):
        gen = torch.Generator(device=DEV).manual_seed(5)
        self.w13 = [torch.randn(experts, 2 * inter, hidden, device=DEV, dtype=torch.bfloat16, generator=gen) / 45
                    for _ in range(copies)]
        self.w2 = [torch.randn(experts, hidden, inter, device=DEV, dtype=torch.bfloat16, generator=gen) / 32
                   for _ in range(copies)]
        self.experts, self.hidden, self.inter, self.top_k = experts, hidden, inter, top_k
        self.expert_bytes = 3 * hidden * inter * 2

    def inputs(self, tokens: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in self.w13:
            tw, ti = routing(tokens, self.experts, self.top_k, gen)
            x = torch.randn(tokens, self.hidden, generator=gen).to(DEV, torch.bfloat16)
            out.append((x, tw, ti))
        return out

    def time(self, cfg: dict, tokens: int, seed: int = 0) -> tuple[float, float]:
        """(seconds per call, distinct routed experts' bytes per call)."""
        ins = self.inputs(tokens, seed)
        K.CONFIG["moe_decode"] = cfg

        def run():
            for (x, tw, ti), w13, w2 in zip(ins, self.w13, self.w2):
                C.accel_fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=tw, topk_ids=ti,
                                      activation="silu", expert_map=None)

        t = graph_time(run, reps=30) / len(ins)
        distinct = sum(len(set(ti.flatten().tolist())) for _, _, ti in ins) / len(ins)
        return t, distinct * self.expert_bytes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--verify-only", action="store_true", help="the checks of the default config, no timing")
    ap.add_argument("--no-sweep", action="store_true", help="time the default tiles only (no tile sweep)")
    ap.add_argument("--rows", default="none,16,32",
                    help="dot row tiles (config 'rows') to compare side by side: pow2 >= 16, or none (one masked "
                         "tile of all the launch's pairs, the path before session 12)")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64", help="token counts (top-2: pairs = 2 x tokens)")
    ap.add_argument("--sweep-tokens", default="1,8",
                    help="token counts the tile sweep scores (the sum of their times); e.g. 8,16,64 for the "
                         "batches that reach fused_experts (batch 1 runs in the persistent MoE layer)")
    args = ap.parse_args()
    try:
        rows_list = [None if r.strip().lower() == "none" else int(r) for r in args.rows.split(",")]
        tokens_list = [int(t) for t in args.tokens.split(",")]
        sweep_tokens = tuple(int(t) for t in args.sweep_tokens.split(","))
    except ValueError:
        ap.error(f"--rows takes pow2 integers or 'none', --tokens and --sweep-tokens integers: got {args.rows!r}, "
                 f"{args.tokens!r}, {args.sweep_tokens!r}")
    if (any(r is not None and (r < 16 or r & (r - 1)) for r in rows_list) or any(t < 1 for t in tokens_list)
            or any(t < 1 for t in sweep_tokens)):
        ap.error(f"--rows: powers of two >= 16 or none; --tokens, --sweep-tokens: positive (got {args.rows!r}, "
                 f"{args.tokens!r}, {args.sweep_tokens!r})")
    args.out.mkdir(parents=True, exist_ok=True)
    default = {"max_pairs": C.MOE_DECODE_CONFIG["max_pairs"], "rows": C.MOE_DECODE_CONFIG["rows"],
               "up": dict(C.MOE_DECODE_CONFIG["up"]), "down": dict(C.MOE_DECODE_CONFIG["down"])}
    try:
        verify(default, args.quick)
    except Exception as exc:
        RES["failures"].append(f"verify: {exc}\n{traceback.format_exc()}")
        log(traceback.format_exc())
    if args.verify_only:
        (args.out / "results.json").write_text(json.dumps(RES, indent=1, default=str))
        print(f"verify of {default}: {len(RES['verify'])} cases, failures: {len(RES['failures'])}")
        for f in RES["failures"]:
            print("FAIL", f)
        return 1 if RES["failures"] else 0
    bw = copy_bw()
    RES["copy_bandwidth_Bps"] = bw
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    layer = Layer(copies=2 if args.quick else 6)
    big = 1 << 20

    def t(up, down, tokens):
        cfg = {"max_pairs": big, "rows": default["rows"], "up": up, "down": down}
        try:
            sec, byt = layer.time(cfg, tokens)
        except Exception as exc:  # a config that does not compile/fit: skipped, recorded
            RES["failures"].append(f"sweep {up} {down} {tokens}: {exc}")
            return float("inf"), 0.0
        RES["sweep"].append(dict(up=up, down=down, tokens=tokens, us=sec * 1e6, floor_us=byt / bw * 1e6))
        log(f"tokens {tokens:3d} up {up} down {down}: {sec * 1e6:.2f} us (floor {byt / bw * 1e6:.2f})")
        return sec, byt

    ups = [dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=3), dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=4),
           dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3), dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
           dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=2),
           dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3), dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=5),
           dict(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=6), dict(BLOCK_N=32, BLOCK_K=128, num_warps=8, num_stages=4),
           dict(BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3)]
    downs = [dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=3), dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=4),
             dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3), dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
             dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
             dict(BLOCK_N=32, BLOCK_K=512, num_warps=4, num_stages=2), dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=2),
             dict(BLOCK_N=64, BLOCK_K=256, num_warps=8, num_stages=2), dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
             dict(BLOCK_N=32, BLOCK_K=128, num_warps=8, num_stages=4)]
    if args.quick:
        ups, downs = ups[:2], downs[:2]
    if args.no_sweep:
        best_up, best_down = default["up"], default["down"]
    else:
        score = lambda up, down: sum(t(up, down, n)[0] for n in sweep_tokens)  # noqa: E731
        best_up = min(ups, key=lambda u: score(u, default["down"]))
        best_down = min(downs, key=lambda d: score(best_up, d))
    RES["best"] = {"up": best_up, "down": best_down}
    log(f"tiles up {best_up} down {best_down}")
    name = lambda r: "masked" if r is None else f"rows {r}"  # noqa: E731
    for tokens in tokens_list:
        try:
            old, byt = layer.time(OLD, tokens)
            new = {}
            for r in rows_list:
                new[name(r)] = layer.time({"max_pairs": big, "rows": r, "up": best_up, "down": best_down}, tokens)[0] * 1e6
        except Exception as exc:
            RES["failures"].append(f"compare {tokens}: {exc}\n{traceback.format_exc()}")
            log(traceback.format_exc())
            break
        row = dict(tokens=tokens, pairs=tokens * 2, old_us=old * 1e6, new_us=min(new.values()), paths_us=new,
                   floor_us=byt / bw * 1e6, distinct=byt / layer.expert_bytes)
        RES["compare"].append(row)
        log("compare", row)
    # the rows variant with the least total time over the measured sizes, then the threshold: the largest
    # pair count up to which that variant beats the sorted grouped GEMM at every measured size
    totals = {name(r): sum(row["paths_us"][name(r)] for row in RES["compare"]) for r in rows_list}
    best_rows = min(rows_list, key=lambda r: totals[name(r)]) if RES["compare"] else default["rows"]
    RES["rows_totals_us"], RES["best_rows"] = totals, best_rows
    win = 0
    for row in RES["compare"]:
        if row["paths_us"][name(best_rows)] < row["old_us"]:
            win = row["pairs"]
        else:
            break
    RES["max_pairs"] = win
    (args.out / "results.json").write_text(json.dumps(RES, indent=1, default=str))
    if not RES["failures"]:
        (args.out / "best.json").write_text(json.dumps({"moe_decode": {"max_pairs": win, "rows": best_rows,
                                                                       "up": best_up, "down": best_down}}))
    names = [name(r) for r in rows_list]
    lines = ["| tokens | pairs | distinct experts | floor us | sorted path us | x floor | "
             + " | ".join(f"decode {n} us | x floor" for n in names) + " |",
             "|---|---|---|---|---|---|" + "---|---|" * len(names)]
    for r in RES["compare"]:
        cells = " | ".join(f"{r['paths_us'][n]:.1f} | {r['paths_us'][n] / r['floor_us']:.2f}" for n in names)
        lines.append(f"| {r['tokens']} | {r['pairs']} | {r['distinct']:.1f} | {r['floor_us']:.1f} | {r['old_us']:.1f} | "
                     f"{r['old_us'] / r['floor_us']:.2f} | {cells} |")
    print("\n".join(lines))
    print(f"rows chosen: {best_rows} (totals {totals}); max_pairs chosen: {win}; failures: {len(RES['failures'])}")
    for f in RES["failures"]:
        print("FAIL", f)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    return 1 if RES["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
