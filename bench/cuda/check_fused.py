"""The CUDA backend's fused ops (hook API 1.3, issue 11): check against float64, then time fused vs composite.

    python bench/cuda/check_fused.py [--rows 1,16,64] [--json OUT.json]          # on the H100
    TRITON_INTERPRET=1 python bench/cuda/check_fused.py --device cpu              # dry run (interpreter)

At the Llama-3.2-1B decode shape (32 query heads, 8 KV heads, head 64, hidden 2048, intermediate 8192,
bfloat16, M = 1, 16, 64 tokens):

* ``rope_and_write_kv_cache``: q/k/v are views of one qkv buffer (as the attention layer passes them),
  the cache is the backend's ``[2, blocks, kv_heads, 16, 64]``, one token per batch has slot -1 (padding).
  Native (one launch) and composite (the backend's rotary, then its KV write: two launches) are both
  compared with the float64 composite of the reference backend: the returned q and k, every written cache
  slot, and every other slot still untouched (NaN).
* ``act_and_mul_linear`` (SiLU): native (at M <= 16 the small-M split-K kernel with the activation at its x
  loads: one launch; at M = 64 act_and_mul + cuBLAS) and composite (act_and_mul, then linear: two
  launches) against the float64 composite of the reference.

Times: a CUDA graph of 16 calls (the layers of one decode step), median of ``--reps`` replays, per call in
microseconds (on cpu one eager call). The down projection's weight rotates over 4 copies (128 MB in bf16) so L2 (50 MB) does not
serve it between calls. On ``--device cpu`` (the Triton interpreter, float32 by default: the interpreter's
bfloat16 dot is wrong) the checks run and the times are eager wall-clock, meaningless: a dry run only.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEADS, KV_HEADS, HEAD, HIDDEN, INTER = 32, 8, 64, 2048, 8192
BLOCK_SIZE, CALLS, COPIES = 16, 16, 4


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: dry run in Triton's interpreter")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--rows", default="1,16,64", help="comma list of M (tokens)")
    p.add_argument("--reps", type=int, default=None, help="graph replays per timing (default 50; 1 on cpu)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--kernel-config", default=None,
                   help="JSON (a string) of entries that replace accel_backend_cuda._triton_kernels.CONFIG's, e.g. "
                        "'{\"linear\": {\"act_min_bytes\": null}}' to time the fused act_and_mul_linear kernel")
    return p.parse_args()


ARGS = parse()
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported
for sub in ("", "backends/reference", "backends/cuda"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

import torch  # noqa: E402

import accel_backend_cuda as C  # noqa: E402
import accel_models  # noqa: E402
from accel_models.testing.tolerances import error_ratio, tolerance  # noqa: E402

F64 = torch.float64
DEV = torch.device(ARGS.device)
DTYPE = getattr(torch, ARGS.dtype or ("bfloat16" if ARGS.device == "cuda" else "float32"))
REPS = ARGS.reps or (50 if ARGS.device == "cuda" else 1)
if ARGS.device == "cpu":
    CALLS = 1  # the interpreter takes seconds per call: one eager call per timing
FAILURES: list[str] = []


def log(*a) -> None:
    print(*a, flush=True)


def tables():
    if ARGS.kernel_config:
        import importlib

        importlib.import_module("accel_backend_cuda._triton_kernels").CONFIG.update(json.loads(ARGS.kernel_config))
        log(f"kernel config override: {ARGS.kernel_config}")
    native = accel_models.resolve_ops("cuda", allow_unavailable=ARGS.device == "cpu")
    composite = accel_models.resolve_ops("cuda", allow_unavailable=ARGS.device == "cpu",
                                         ops="rope_and_write_kv_cache=composite,act_and_mul_linear=composite")
    ref = accel_models.resolve_ops("reference")
    for op in ("rope_and_write_kv_cache", "act_and_mul_linear"):
        assert native.providers[op] == "cuda", native.providers
        assert composite.providers[op] == "composite", composite.providers
    return native, composite, ref


def per_call_us(fn) -> float:
    """Microseconds per call: a CUDA graph of fn (CALLS calls), median of REPS replays (eager on cpu)."""
    if DEV.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6 / CALLS
    graph = C.accel_capture_graph(fn=fn, device=DEV, pool=None)  # warm-up runs, then capture
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def check(name: str, op: str, pairs) -> float:
    """Worst error / tolerance over (what, out, expected float64) pairs; records a failure above 1."""
    rtol, atol = tolerance(op, DTYPE)
    worst = 0.0
    for what, out, exp in pairs:
        r = error_ratio(out, exp, rtol, atol)
        worst = max(worst, r)
        if r > 1:
            FAILURES.append(f"{name}: {what} error {r:.3g} x tolerance")
    return worst


# ----------------------------------------------------------------------------------------------------


def rope_case(m: int, g: torch.Generator):
    qkv = torch.randn(m, (HEADS + 2 * KV_HEADS) * HEAD, generator=g, dtype=F64).to(DTYPE)
    pos = torch.randint(0, 8192, (m,), generator=g)
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD, 2, dtype=torch.float32) / HEAD))
    ang = torch.arange(8192, dtype=torch.float32)[:, None] * inv[None, :]
    cos_sin = torch.cat((ang.cos(), ang.sin()), -1)  # float32 [8192, 64], as get_rope builds it
    blocks = -(-m // BLOCK_SIZE) + 4
    slots = torch.randperm(blocks * BLOCK_SIZE, generator=g)[:m]
    if m > 1:
        slots[m // 2] = -1  # a padding token: rotated, never written
    return qkv, pos, cos_sin, blocks, slots


def run_rope(native, composite, ref, m: int) -> dict:
    g = torch.Generator().manual_seed(m)
    qkv, pos, cos_sin, blocks, slots = rope_case(m, g)
    split = [HEADS * HEAD, KV_HEADS * HEAD, KV_HEADS * HEAD]

    def views(buf):
        q, k, v = buf.split(split, dim=-1)
        return q.view(m, HEADS, HEAD), k.view(m, KV_HEADS, HEAD), v.view(m, KV_HEADS, HEAD)

    # float64 composite of the reference (cos/sin in the dtype, as the contract says)
    q64, k64, v64 = (t.to(F64).clone() for t in views(qkv))
    ref_cache = ref.allocate_kv_cache(num_blocks=blocks, block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD,
                                      dtype=F64, device=torch.device("cpu"))
    eq, ek = ref.rope_and_write_kv_cache(positions=pos, query=q64, key=k64, value=v64,
                                         cos_sin_cache=cos_sin.to(DTYPE).to(F64), head_size=HEAD, rotary_dim=HEAD,
                                         is_neox=True, kv_cache=ref_cache, slot_mapping=slots)
    row = {"op": "rope_and_write_kv_cache", "M": m}
    outs = {}
    for label, table in (("native", native), ("composite", composite)):
        buf = qkv.to(DEV, copy=True)  # each run rotates its own copy in place
        q, k, v = views(buf)
        cache = table.allocate_kv_cache(num_blocks=blocks, block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS,
                                        head_size=HEAD, dtype=DTYPE, device=DEV)
        cache.fill_(float("nan"))
        args = dict(positions=pos.to(DEV), cos_sin_cache=cos_sin.to(DEV), head_size=HEAD, rotary_dim=HEAD,
                    is_neox=True, kv_cache=cache, slot_mapping=slots.to(DEV))
        qo, ko = table.rope_and_write_kv_cache(query=q, key=k, value=v, **args)
        cache_c = cache.cpu()
        written = torch.zeros(2, blocks, KV_HEADS, BLOCK_SIZE, dtype=torch.bool)
        got_k, exp_k, got_v, exp_v = [], [], [], []
        for t, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            b, off = divmod(slot, BLOCK_SIZE)
            written[:, b, :, off] = True
            got_k.append(cache_c[0, b, :, off])
            got_v.append(cache_c[1, b, :, off])
            exp_k.append(ek[t])
            exp_v.append(v64[t])
        name = f"rope_and_write_kv_cache {label} M={m}"
        row[f"{label}_err"] = check(name, "rotary_embedding", [("query", qo, eq), ("key", ko, ek)])
        row[f"{label}_err"] = max(row[f"{label}_err"], check(name, "rotary_embedding", [
            ("cached keys", torch.stack(got_k), torch.stack(exp_k)),
            ("cached values", torch.stack(got_v), torch.stack(exp_v))]))
        if not torch.isnan(cache_c[~written]).all():
            FAILURES.append(f"{name}: a slot nothing should write was written (padding slot -1?)")
        outs[label] = (qo.cpu(), ko.cpu(), cache_c)

        q_, k_, v_ = views(qkv.to(DEV, copy=True))  # timing inputs (rotated in place again and again: values do not matter)

        def step(table=table, q_=q_, k_=k_, v_=v_, args=args):
            for _ in range(CALLS):
                table.rope_and_write_kv_cache(query=q_, key=k_, value=v_, **args)

        row[f"{label}_us"] = per_call_us(step)
    row["bitwise_equal"] = all(torch.equal(a.nan_to_num(), b.nan_to_num())
                               for a, b in zip(outs["native"], outs["composite"]))
    return row


def run_act_linear(native, composite, ref, m: int) -> dict:
    g = torch.Generator().manual_seed(100 + m)
    x64 = torch.randn(m, 2 * INTER, generator=g, dtype=F64)
    w64 = torch.randn(HIDDEN, INTER, generator=g, dtype=F64) * INTER**-0.5
    x, w = x64.to(DTYPE), w64.to(DTYPE)
    expect = ref.act_and_mul_linear(x=x.to(F64), weight=w.to(F64), bias=None, prepared=None, activation="silu")
    row = {"op": "act_and_mul_linear", "M": m}
    outs = {}
    xs = x.to(DEV)
    weights = [w.to(DEV)] + [w.to(DEV).clone() for _ in range(COPIES - 1 if DEV.type == "cuda" else 0)]
    for label, table in (("native", native), ("composite", composite)):
        prepared = [table.prepare_linear(weight=wt) for wt in weights]
        out = table.act_and_mul_linear(x=xs, weight=weights[0], bias=None, prepared=prepared[0], activation="silu")
        row[f"{label}_err"] = check(f"act_and_mul_linear {label} M={m}", "act_and_mul_linear", [("out", out, expect)])
        outs[label] = out.cpu()

        def step(table=table, prepared=prepared):
            for i in range(CALLS):
                j = i % len(weights)
                table.act_and_mul_linear(x=xs, weight=weights[j], bias=None, prepared=prepared[j], activation="silu")

        row[f"{label}_us"] = per_call_us(step)
    row["bitwise_equal"] = torch.equal(outs["native"], outs["composite"])
    return row


def main() -> int:
    rows = [int(r) for r in ARGS.rows.split(",") if r.strip()]
    native, composite, ref = tables()
    dev_name = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu (Triton interpreter: dry run)"
    import triton

    log(f"device {dev_name}, torch {torch.__version__}, triton {triton.__version__}, dtype {DTYPE}, "
        f"{CALLS} calls per graph, median of {REPS} replays")
    results = []
    for m in rows:
        for run in (run_rope, run_act_linear):
            t0 = time.perf_counter()
            results.append(run(native, composite, ref, m))
            log(f"  {results[-1]['op']} M={m}: {time.perf_counter() - t0:.1f} s")
    log("")
    head = f"{'op':<24} {'M':>3}  {'fused us':>9}  {'composite us':>12}  {'speedup':>7}  {'err/tol fused':>13}  " \
           f"{'err/tol comp':>12}  {'same bits':>9}"
    log(head)
    log("-" * len(head))
    for r in results:
        log(f"{r['op']:<24} {r['M']:>3}  {r['native_us']:>9.2f}  {r['composite_us']:>12.2f}  "
            f"{r['composite_us'] / r['native_us']:>6.2f}x  {r['native_err']:>13.3f}  {r['composite_err']:>12.3f}  "
            f"{str(r['bitwise_equal']):>9}")
    if DEV.type != "cuda":
        log("\n(dry run: interpreter wall-clock times are meaningless)")
    log("\n" + ("FAILED:\n  " + "\n  ".join(FAILURES) if FAILURES else "all checks passed"))
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps({"device": dev_name, "dtype": str(DTYPE), "torch": torch.__version__,
                                               "triton": triton.__version__, "calls_per_graph": CALLS,
                                               "reps": REPS, "results": results, "failures": FAILURES}, indent=2))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
