"""Op binding overhead: a bound op call vs a direct call of the same function vs a pluggy hook call.

    python bench/bench_dispatch.py [--iterations 2000] [--repeats 101]

Times, side by side in one run and interleaved (so load drifts hit every variant alike):

* ``direct``  ``accel_backend_reference.accel_rms_norm(x=x, weight=w, eps=eps)``
* ``bound``   ``ops.rms_norm(x=x, weight=w, eps=eps)`` with ``ops = accel_models.resolve_ops("reference")``
* ``pluggy``  ``pm.hook.accel_rms_norm(x=x, weight=w, eps=eps)`` (the registry's plugin manager, loaded
  with the reference alone (``ACCEL_PLUGINS=reference``), so pluggy calls that same function)

on rms_norm of a [4, 64] float32 tensor, then the same three on a trivial op (a throwaway backend whose
``accel_silu_and_mul`` returns its input) to show the raw per-call dispatch cost. Each figure is the
median over ``--repeats`` of the mean time per call over ``--iterations`` calls; the ratios are medians
of per-repeat ratios. Exits 1 if the bound rms_norm call is not within 5% of the direct call.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import timeit
import types

import torch

import accel_backend_reference
import accel_models
from accel_models import BackendInfo, hookimpl
from accel_models import backends as B


def trivial_backend() -> types.ModuleType:
    """A backend module whose silu_and_mul does nothing, so a call costs only its dispatch."""
    mod = types.ModuleType("bench_trivial_backend")

    @hookimpl
    def accel_backend_info() -> BackendInfo:
        return BackendInfo(name="bench_trivial", device_type="cpu", available=True, reason=None)

    @hookimpl
    def accel_silu_and_mul(x):
        return x

    mod.accel_backend_info = accel_backend_info
    mod.accel_silu_and_mul = accel_silu_and_mul
    return mod


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def measure(stmts: dict[str, str], env: dict, iterations: int, repeats: int) -> dict[str, list[float]]:
    """ns per call, one sample per repeat; the variants are interleaved within each repeat."""
    timers = {name: timeit.Timer(stmt, globals=env) for name, stmt in stmts.items()}
    for t in timers.values():  # warm up
        t.timeit(max(1, iterations // 10))
    samples: dict[str, list[float]] = {name: [] for name in stmts}
    for r in range(repeats):
        order = list(timers) if r % 2 == 0 else list(reversed(timers))
        for name in order:
            samples[name].append(timers[name].timeit(iterations) / iterations * 1e9)
    return samples


def summarize(samples: dict[str, list[float]]) -> dict[str, float]:
    """Median ns/call of each variant, and the median of the per-repeat ratios to ``direct`` (a ratio of
    samples taken back to back is steadier under background load than a ratio of medians)."""
    out = {name: statistics.median(v) for name, v in samples.items()}
    for name in ("bound", "pluggy"):
        out[f"{name}/direct"] = statistics.median(a / d for a, d in zip(samples[name], samples["direct"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000, help="calls per timing sample")
    parser.add_argument("--repeats", type=int, default=101, help="timing samples per variant (median taken)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: less noise)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # load only the reference from entry points, so pluggy's hook calls the same function as the others
    os.environ["ACCEL_PLUGINS"] = "reference"
    os.environ.pop("ACCEL_TRACE", None)
    B.reset_registry()
    ops = accel_models.resolve_ops("reference")
    pm = B.get_registry().pm
    assert [i.function for i in pm.hook.accel_rms_norm.get_hookimpls()] == [accel_backend_reference.accel_rms_norm]
    assert ops.rms_norm is accel_backend_reference.accel_rms_norm  # bound = the hookimpl function itself

    x = torch.randn(4, 64)
    w = torch.randn(64)
    env = {"ops": ops, "ref": accel_backend_reference, "pm": pm, "x": x, "w": w, "eps": 1e-6}
    kw = "x=x, weight=w, eps=eps"
    rms = summarize(measure({
        "direct": f"ref.accel_rms_norm({kw})",
        "bound": f"ops.rms_norm({kw})",
        "pluggy": f"pm.hook.accel_rms_norm({kw})",
    }, env, args.iterations, args.repeats))

    # trivial op: a throwaway backend registered in-process; pluggy then holds two silu_and_mul impls
    # (firstresult: the last registered, the trivial one, runs first and returns)
    trivial = trivial_backend()
    B.register_backend(trivial, "bench_trivial")
    tops = accel_models.resolve_ops("bench_trivial")
    assert tops.silu_and_mul is trivial.accel_silu_and_mul
    assert pm.hook.accel_silu_and_mul(x=x) is x
    env.update(tops=tops, T=trivial)
    triv = summarize(measure({
        "direct": "T.accel_silu_and_mul(x=x)",
        "bound": "tops.silu_and_mul(x=x)",
        "pluggy": "pm.hook.accel_silu_and_mul(x=x)",
    }, env, args.iterations * 5, args.repeats))
    B.unregister_backend("bench_trivial")

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}; "
          f"torch {torch.__version__}; pluggy {__import__('pluggy').__version__}; torch threads {args.threads}")
    print(f"median of {args.repeats} repeats of {args.iterations} (trivial: {args.iterations * 5}) calls each\n")
    print("| op | direct (ns/call) | bound (ns/call) | pluggy (ns/call) | bound / direct | pluggy / direct |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in (("rms_norm [4, 64] fp32", rms), ("trivial (returns x)", triv)):
        print(f"| {label} | {r['direct']:.0f} | {r['bound']:.0f} | {r['pluggy']:.0f} | "
              f"{r['bound/direct']:.3f} | {r['pluggy/direct']:.2f} |")
    ratio = rms["bound/direct"]
    ok = abs(ratio - 1.0) <= 0.05
    print(f"\nbound / direct on rms_norm = {ratio:.3f}: {'within' if ok else 'NOT within'} 5%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
