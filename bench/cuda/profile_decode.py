"""Per-kernel profile of one decode step of the Llama-3.2-1B shape on one GPU (which kernels miss the floor).

    python bench/cuda/profile_decode.py --out DIR [--batches 1,64] [--steps 24] [--quick]

Builds the same model as bench_decode.py (its builders, imported: random bf16 weights saved with
transformers' save_pretrained, loaded by accel_models.LLM on the CUDA backend), 128-token prompts. For each
batch: the captured decode graph's replay time (CUDA events, median of 50) and its kernels (torch.profiler
over 20 replays); then graphs off, torch.profiler (CPU + CUDA activities, shapes recorded) around
`LLM.generate` with 1 and with 1 + STEPS new tokens. Per kernel: (run with 1 + STEPS tokens - run with 1
token) / STEPS, so prefill cancels, as in bench_decode.py's step time.

Each GPU kernel is attributed to the innermost aten GEMM op around its launch (from the trace's correlation
ids); GEMMs are labelled by shape (qkv, o_proj, gate_up, down, lm_head), other kernels keep their name. Bytes
a step must move: each GEMM's weight once per call (bf16), the KV cache at the profiled mean context for
attention; achieved GB/s = bytes / GPU time, against the copy bandwidth measured first (read + write of a
1 GiB device copy). Writes DIR/profile.json, DIR/summary.md (all tables) and prints the summary.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import platform
import sys
import tempfile
import traceback
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def log(*a) -> None:
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------------
# trace parsing (pure Python: tested on CPU with a synthetic trace)
# ----------------------------------------------------------------------------------------------------


def gemm_kn(op: str, dims: list) -> tuple[int, int, int] | None:
    """(M, K, N) of a GEMM op from its recorded input dims, or None."""
    try:
        if op == "aten::mm":
            (m, k), (_, n) = dims[0], dims[1]
        elif op == "aten::addmm":
            (m, k), (_, n) = dims[1], dims[2]
        elif op == "aten::linear":
            a, w = dims[0], dims[1]
            m, k, n = 1, a[-1], w[0]
            for d in a[:-1]:
                m *= d
        elif op == "aten::matmul":
            a, b = dims[0], dims[1]
            m, k, n = 1, a[-1], b[-1]
            for d in a[:-1]:
                m *= d
        else:
            return None
        return int(m), int(k), int(n)
    except (TypeError, ValueError, IndexError):
        return None


def gemm_labels(cfg) -> dict[tuple[int, int], str]:
    H, nh, kvh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or H // nh
    inter, V = cfg.intermediate_size, cfg.vocab_size
    lab = {(H, (nh + 2 * kvh) * hd): "qkv_proj", (H, nh * hd): "q_proj", (H, kvh * hd): "k/v_proj",
           (nh * hd, H): "o_proj", (H, 2 * inter): "gate_up_proj", (H, inter): "gate/up_proj",
           (inter, H): "down_proj", (H, V): "lm_head"}
    return lab


def kernel_table(trace: dict, labels: dict) -> dict[str, dict]:
    """{key: {calls, us, kernels: set, k, n}} over the GPU events of a chrome trace (torch.profiler export).

    key: "gemm <label> (KxN)" when the kernel's launch lies inside an aten GEMM op (innermost one), else the
    kernel's name (memcpy/memset: their category name)."""
    ev = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops_by_tid: dict = defaultdict(list)
    launches = {}
    for e in ev:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat == "cpu_op":
            ops_by_tid[(e.get("pid"), e.get("tid"))].append(e)
        elif cat in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    # innermost enclosing GEMM op for each launch: ops sorted by start; walk back over those that started
    # earlier and still run at the launch (ops nest, so the latest-starting enclosing one is innermost)
    starts = {}
    for key, ops in ops_by_tid.items():
        ops.sort(key=lambda o: (o["ts"], -o.get("dur", 0)))
        starts[key] = [o["ts"] for o in ops]

    def enclosing_gemm(rt):
        key = (rt.get("pid"), rt.get("tid"))
        ops = ops_by_tid.get(key)
        if not ops:
            return None
        i = bisect.bisect_right(starts[key], rt["ts"]) - 1
        steps = 0
        while i >= 0 and steps < 400:
            o = ops[i]
            if o["name"] in GEMM_OPS and o["ts"] + o.get("dur", 0) >= rt["ts"]:
                return o
            i -= 1
            steps += 1
        return None

    out: dict = {}
    for e in ev:
        if e.get("ph") != "X" or e.get("cat") not in GPU_CATS:
            continue
        name = e.get("name", "?")
        key, k, n = (name[:100] if e["cat"] == "kernel" else e["cat"]), None, None
        rt = launches.get(e.get("args", {}).get("correlation"))
        op = enclosing_gemm(rt) if rt is not None else None
        if op is not None:
            mkn = gemm_kn(op["name"], op.get("args", {}).get("Input Dims", []))
            if mkn:
                m, k, n = mkn
                key = f"gemm {labels.get((k, n), '?')} M={m} ({k}x{n})"
            else:
                key = f"gemm {op['name']} {name[:60]}"
        row = out.setdefault(key, {"calls": 0, "us": 0.0, "kernels": set(), "k": k, "n": n, "op_ids": set()})
        if op is not None:
            row["op_ids"].add((op.get("tid"), op["ts"]))
        row["calls"] += 1
        row["us"] += float(e.get("dur", 0.0))
        row["kernels"].add(name[:100])
    return out


def diff_tables(long: dict, short: dict, steps: int) -> dict[str, dict]:
    """Per-step rows: (long - short) / steps; keys only in one run count as 0 in the other."""
    out = {}
    for key in set(long) | set(short):
        a, b = long.get(key), short.get(key)
        calls = ((a["calls"] if a else 0) - (b["calls"] if b else 0)) / steps
        us = ((a["us"] if a else 0.0) - (b["us"] if b else 0.0)) / steps
        if abs(calls) < 1e-9 and abs(us) < 0.05:
            continue
        src = a or b
        ops = (len(a["op_ids"]) if a else 0) - (len(b["op_ids"]) if b else 0)
        out[key] = {"calls": calls, "us": us, "kernels": sorted(src["kernels"]), "k": src["k"], "n": src["n"],
                    "ops": ops / steps}
    return out


def per_step(table: dict, reps: int) -> dict[str, dict]:
    return {k: {"calls": v["calls"] / reps, "us": v["us"] / reps, "kernels": sorted(v["kernels"]), "k": v["k"],
                "n": v["n"], "ops": len(v["op_ids"]) / reps} for k, v in table.items()}


def add_bytes(rows: dict, kv_bytes_step: float, _unused: float, bw: float) -> None:
    """Bytes a step must move for the main kernels, achieved GB/s, and the floor time at bw.

    A GEMM op may launch several kernels (split-K GEMM + reduce, memset + GEMM): the weight counts once per op.
    Rows without an op count (profile.json of the first run) take calls / distinct kernel names."""
    for key, r in rows.items():
        b = None
        if key.startswith("gemm") and r["k"] and r["n"]:
            ops = r.get("ops") or r["calls"] / max(1, len(r["kernels"]))
            r["ops"] = ops
            b = ops * r["k"] * r["n"] * 2  # the bf16 weight, once per op
        elif "attention" in key or "attn" in key:
            b = kv_bytes_step
        r["bytes"] = b
        r["GBps"] = b / (r["us"] * 1e-6) / 1e9 if b and r["us"] > 0 else None
        r["floor_us"] = b / bw * 1e6 if b else None
        r["x_floor"] = r["us"] / r["floor_us"] if r["floor_us"] else None


def label_graph_gemms(graph_rows: dict, eager_rows: dict, batch: int) -> None:
    """Give graph-replay GEMM kernels (launched by cudaGraphLaunch: no op around them) the shape of the eager
    decode GEMM that used the same kernel name; the first name of an eager row is its main kernel."""
    by_name = {}
    for key, r in eager_rows.items():
        if key.startswith("gemm") and f" M={batch} " in key and r["k"]:
            for nm in r["kernels"]:
                if nm.startswith("nvjet") or "gemm" in nm.lower():
                    by_name.setdefault(nm, []).append((key, r))
    for nm, r in list(graph_rows.items()):
        hits = by_name.get(nm)
        if not hits:
            continue
        k = sum(h[1]["k"] * h[1]["n"] * h[1]["ops"] for h in hits)  # weight elements per step, all users
        r["k"], r["n"], r["ops"] = 1, k, 1.0
        graph_rows["gemm " + " + ".join(h[0].split(" M=")[0][5:] for h in hits) + f" [{nm[:40]}]"] = \
            graph_rows.pop(nm)


def render(rows: dict, title: str, bw: float | None) -> str:
    tot = sum(r["us"] for r in rows.values())
    lines = [f"### {title}", "", f"total GPU time per step: {tot:.1f} us", "",
             "| kernel (GEMMs by weight shape) | calls/step | us/step | % | MB/step | GB/s | floor us | x floor |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(rows.items(), key=lambda kv: -kv[1]["us"]):
        b = r.get("bytes")
        lines.append(
            f"| {key} | {r['calls']:.2f} | {r['us']:.1f} | {100 * r['us'] / tot if tot else 0:.1f} | "
            f"{b / 1e6:.1f} | {r['GBps']:.0f} | {r['floor_us']:.1f} | {r['x_floor']:.2f} |" if b and r.get("GBps")
            else f"| {key} | {r['calls']:.2f} | {r['us']:.1f} | {100 * r['us'] / tot if tot else 0:.1f} | - | - | - | - |")
    gemms = {k: r for k, r in rows.items() if k.startswith("gemm")}
    if gemms:
        lines += ["", "GEMM kernels: " + "; ".join(f"{k}: {', '.join(r['kernels'])}" for k, r in gemms.items())]
    if bw:
        lines += ["", f"(floor at the copy bandwidth {bw / 1e12:.2f} TB/s)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# GPU part
# ----------------------------------------------------------------------------------------------------


def profiled(fn, shapes: bool = True) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=shapes) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    prof.export_chrome_trace(path)
    trace = json.loads(Path(path).read_text())
    Path(path).unlink()
    return trace


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=24, help="profiled eager decode steps (after prefill)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a check of the script")
    ap.add_argument("--rerender", type=Path, help="a profile.json: recompute bytes and tables, no GPU needed")
    args = ap.parse_args()
    if args.rerender:
        res = json.loads(args.rerender.read_text())
        text = summarize(res, args.steps, args.prompt)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.md").write_text(text + "\n")
        log(text)
        return 0
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA GPU (torch.cuda.is_available() is False): run it on the GPU "
              "machine, see docs/BENCHMARKS.md 'Decode step profile (H100)'", file=sys.stderr)
        return 2
    if args.steps < 2:
        ap.error("--steps must be at least 2")
    batches = [int(x) for x in args.batches.split(",") if x]
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    import transformers
    import triton
    from bench_decode import build_hf, copy_bandwidth, llm_generate, replay_time, step_bytes

    from accel_models.runtime.llm import LLM

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "argv": sys.argv}
    log(json.dumps(env))
    res: dict = {"env": env, "batches": {}}
    bw = copy_bandwidth()
    res["copy_bandwidth_Bps"] = bw
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")

    path = Path("/tmp/profile_decode_llama-1b")
    hf, cfg = build_hf("llama-1b", args.quick, path)
    labels = gemm_labels(cfg)
    max_len = args.prompt + args.steps + 16
    max_b = max(batches)
    hd = cfg.hidden_size // cfg.num_attention_heads
    kv_tok = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * hd * 2
    llm = LLM(path, backend="cuda", dtype=torch.bfloat16, max_num_seqs=max_b, max_model_len=max_len,
              kv_cache_memory=int(1.25 * kv_tok * max_len * max_b) + (64 << 20),
              max_num_batched_tokens=max(2048, args.prompt * max_b), graph_batch_sizes=batches,
              enable_prefix_caching=False)  # the 1- and 25-token runs must prefill alike for the difference
    lm_bytes = cfg.vocab_size * cfg.hidden_size * 2
    g = torch.Generator().manual_seed(1)
    for b in batches:
        plist = torch.randint(1, cfg.vocab_size, (b, args.prompt), generator=g).tolist()
        r: dict = {}
        llm_generate(llm, plist, 3)  # warm (Triton compiles, graphs)
        ctx_graph = args.prompt + 3
        r["graph_replay_ms"] = (replay_time(llm, b) or float("nan")) * 1e3
        r["floor_ms"] = step_bytes(hf, cfg, b, ctx_graph) / bw * 1e3
        graph = llm.graphs.graphs[b] if llm.graphs is not None and b in llm.graphs.graphs else None
        if graph is not None:
            try:
                reps = 20
                tr = profiled(lambda: [graph.replay() for _ in range(reps)], shapes=False)
                rows_g = per_step(kernel_table(tr, labels), reps)
                r["graph_kernels"] = rows_g
            except Exception as exc:  # keep the eager profile
                log(f"b={b} graph profile FAILED: {exc}\n{traceback.format_exc()}")
        # eager steps: graphs off, prefill cancels in the difference
        graphs, llm.graphs = llm.graphs, None
        llm_generate(llm, plist, 3)
        t_short = profiled(lambda: llm_generate(llm, plist, 1))
        t_long = profiled(lambda: llm_generate(llm, plist, 1 + args.steps))
        llm.graphs = graphs
        rows = diff_tables(kernel_table(t_long, labels), kernel_table(t_short, labels), args.steps)
        ctx = args.prompt + (args.steps + 1) / 2
        kv_step = kv_tok * ctx * b
        r["eager_kernels"] = rows
        r["kv_bytes_step"], r["kv_bytes_graph"] = kv_step, kv_tok * ctx_graph * b
        r["floor_ms_eager_ctx"] = step_bytes(hf, cfg, b, ctx) / bw * 1e3
        res["batches"][str(b)] = r
        tot = sum(x["us"] for x in rows.values())
        log(f"b={b}: graph replay {r['graph_replay_ms']:.3f} ms, eager kernel sum {tot / 1e3:.3f} ms/step, "
            f"floor {r['floor_ms']:.3f} ms")
        (args.out / "profile.json").write_text(json.dumps(res, indent=1, default=str))
    llm.shutdown()
    text = summarize(res, args.steps, args.prompt)
    (args.out / "profile.json").write_text(json.dumps(res, indent=1, default=str))
    (args.out / "summary.md").write_text(text + "\n")
    log("\n" + text)
    return 0


def summarize(res: dict, steps: int, prompt: int) -> str:
    """Bytes, GB/s and the markdown tables from the raw per-step rows (also for --rerender)."""
    env, bw = res["env"], res["copy_bandwidth_Bps"]
    out = [f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}, "
           f"transformers {env['transformers']}, Python {env['python']}, {env['date']}",
           f"copy bandwidth {bw / 1e12:.2f} TB/s; {steps} eager decode steps profiled per batch", ""]
    ctx, ctx_graph = prompt + (steps + 1) / 2, prompt + 3
    for b, r in res["batches"].items():
        rows = r["eager_kernels"]
        kv_graph = r.get("kv_bytes_graph") or r["kv_bytes_step"] * ctx_graph / ctx
        add_bytes(rows, r["kv_bytes_step"], 0, bw)
        out += [f"## batch {b}", "",
                f"graph replay {r['graph_replay_ms']:.3f} ms (CUDA events, median of 50); floor "
                f"{r['floor_ms_eager_ctx']:.3f} ms at mean context {ctx:.1f}; KV per step "
                f"{r['kv_bytes_step'] / 1e6:.1f} MB", "",
                render(rows, f"eager decode step, batch {b} (per step, prefill differenced out)", bw), ""]
        if "graph_kernels" in r:
            label_graph_gemms(r["graph_kernels"], rows, int(b))
            add_bytes(r["graph_kernels"], kv_graph, 0, bw)
            out += [render(r["graph_kernels"], f"graph replay, batch {b} (per replay, context {ctx_graph})", bw), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
