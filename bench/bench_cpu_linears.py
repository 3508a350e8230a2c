"""Per-step cost of the benchmark model's 33 float32 linears on the cpu backend's kernels, weights cold.

The model of bench_generate.py (hidden 512, 8 layers, intermediate 1376, vocab 32000): per layer qkv
768 x 512, o 512 x 512, gate_up 2752 x 512, down 512 x 1376, then the 32000 x 512 LM head; 33 calls per
decode step, 154 MB of float32 weights, each weight its own buffer, so (as in a real decode step) none is
cache-resident when its call comes. Per row count, the time of the 33 calls in order (ms), median of
``--reps`` repetitions; the engines alternate within each repetition, so background load hits all alike.

    python bench/bench_cpu_linears.py [--rows 1,2,3,4,8,12,16,24,64] [--reps 7] [--lib NAME=path.so ...]

Engines: "native" is the backend as configured (the GEMV up to GEMV_MAX_ROWS rows, else the panel GEMM, or
oneDNN where the backend routes those rows there); "onednn" oneDNN's packed inner product
(``ACCEL_CPU_LINEAR=onednn``); each ``--lib NAME=path`` a kernel library built from other sources (e.g. an
older commit's csrc/ compiled with native.py's flags), called directly: the GEMV up to ``--gemv-rows`` rows,
the panel GEMM above, weights packed with that library's own accel_pack_panels_f32.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

import accel_backend_cpu as cpu
from accel_backend_cpu import native

H, I, V, LAYERS = 512, 1376, 32000, 8
SHAPES = [(768, H), (H, H), (2 * I, H), (H, I)] * LAYERS + [(V, H)]  # (n, k) of each call, in step order


def _load(path: str) -> ctypes.CDLL:
    dll = ctypes.CDLL(path)
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for name, res, args in (("accel_gemv_f32", i32, [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, i32]),
                            ("accel_panels_numel", i64, [i64, i64]),
                            ("accel_pack_panels_f32", None, [ptr, i64, i64, i64, ptr, i32]),
                            ("accel_gemm_panels_f32", i32, [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i32])):
        f = getattr(dll, name)
        f.restype, f.argtypes = res, args
    return dll


def lib_engine(dll: ctypes.CDLL, weights: list[torch.Tensor], gemv_rows: int):
    threads = torch.get_num_threads()
    panels = []
    for w in weights:
        n, k = w.shape
        p = torch.empty(int(dll.accel_panels_numel(n, k)), dtype=torch.float32)
        dll.accel_pack_panels_f32(w.data_ptr(), k, n, k, p.data_ptr(), threads)
        panels.append(p)

    def step(xs: dict[int, torch.Tensor]) -> None:
        for w, p in zip(weights, panels):
            n, k = w.shape
            x = xs[k]
            m = x.shape[0]
            out = torch.empty((m, n), dtype=torch.float32)
            if m <= gemv_rows:
                dll.accel_gemv_f32(x.data_ptr(), k, w.data_ptr(), k, None, out.data_ptr(), n, m, n, k, threads)
            else:
                dll.accel_gemm_panels_f32(x.data_ptr(), k, p.data_ptr(), None, out.data_ptr(), n, m, n, k, threads)

    return step


def backend_engine(weights: list[torch.Tensor], mode: str, monkeypatch_env: dict[str, str]):
    import os

    os.environ["ACCEL_CPU_LINEAR"] = mode
    prepared = [cpu.accel_prepare_linear(weight=w) for w in weights]
    assert all(p is not None for p in prepared)

    def step(xs: dict[int, torch.Tensor]) -> None:
        os.environ["ACCEL_CPU_LINEAR"] = mode
        for w, p in zip(weights, prepared):
            cpu.accel_linear(x=xs[w.shape[1]], weight=w, bias=None, prepared=p)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,3,4,8,12,16,24,64")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--engines", default="native,onednn")
    ap.add_argument("--lib", action="append", default=[], help="NAME=path.so: another kernel library")
    ap.add_argument("--gemv-rows", type=int, default=2, help="rows up to which a --lib engine runs its GEMV")
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * k**-0.5 for n, k in SHAPES]
    engines = {}
    for e in args.engines.split(","):
        if e:
            engines[e] = backend_engine(weights, e, {})
    for spec in args.lib:
        name, path = spec.split("=", 1)
        engines[name] = lib_engine(_load(path), weights, args.gemv_rows)
    lib = native.kernels()
    print(f"threads {torch.get_num_threads()}, library {getattr(lib, '_name', None)}")
    if hasattr(lib, "accel_gemm_isa"):
        print(f"kernel ISA: {lib.accel_gemm_isa().decode()}")
    rows = [int(r) for r in args.rows.split(",")]
    print("| rows | " + " | ".join(engines) + " |")
    print("|---:|" + "---:|" * len(engines))
    for m in rows:
        xs = {k: torch.randn(m, k) for k in {k for _, k in SHAPES}}
        times: dict[str, list[float]] = {e: [] for e in engines}
        for e in engines.values():  # warm-up: page in outputs, build oneDNN primitives
            e(xs)
        for _ in range(args.reps):
            for name, e in engines.items():
                t0 = time.perf_counter()
                e(xs)
                times[name].append(time.perf_counter() - t0)
        print(f"| {m} | " + " | ".join(f"{statistics.median(t) * 1e3:.2f}" for t in times.values()) + " |",
              flush=True)


if __name__ == "__main__":
    main()
