"""The CPU backend's native kernels (csrc/*.c): plain C compiled on first use with the machine's compiler, called
through ctypes.

Why not a torch C++ extension: including torch's headers costs ~30 s of compilation per build on a 2-core
machine, and a prebuilt wheel would have to match every torch release; these kernels only need pointers.
The shared library is cached under ``$ACCEL_CPU_CACHE`` (default ``~/.cache/accel_models/cpu``) by a hash
of the source, the compiler command and the CPU's instruction-set flags (``-march=native``). When no
compiler is found, or the build fails, or ``ACCEL_CPU_NATIVE=0``, :func:`kernels` returns None once with a
logged reason and the backend keeps its pure-torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger("accel_backend_cpu")

_SOURCES = ("decode_attention.c", "elementwise.c", "gemm.c", "gemv.c", "threads.c")
#: ``-ffp-contract=fast``: ISO C modes (``-std=c11``) turn GCC's contraction of ``a += w * x`` into fused
#: multiply-adds off, and every kernel then ran separate multiplies and adds: the panel GEMM at half the
#: FMA rate (63 against 110 GFLOP/s per core measured on the CI machine), decode attention likewise.
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


@functools.lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (with the reason logged once) when it cannot be had here."""
    if os.environ.get("ACCEL_CPU_NATIVE", "1") == "0":
        logger.info("native CPU kernels off (ACCEL_CPU_NATIVE=0): pure-torch paths")
        return None
    cc = _compiler()
    if cc is None:
        logger.warning("no C compiler (cc, gcc or clang) on PATH: the cpu backend uses its pure-torch decode "
                       "attention (install gcc for the native kernel)")
        return None
    src_dir = Path(__file__).with_name("csrc")
    sources = [src_dir / s for s in _SOURCES]
    digest = hashlib.sha256()
    for s in sources:
        digest.update(s.read_bytes())
    digest.update(" ".join((cc, *_FLAGS)).encode())
    digest.update(_cpu_flags().encode())
    cache = Path(os.environ.get("ACCEL_CPU_CACHE", Path.home() / ".cache" / "accel_models" / "cpu"))
    lib = cache / f"accel_cpu_kernels-{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then move: no half-written .so
                out = Path(tmp) / lib.name
                proc = subprocess.run([cc, *_FLAGS, "-o", str(out), *map(str, sources), "-lm"],
                                      capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    logger.warning("building the cpu backend's native kernels failed (%s); using the pure-torch "
                                   "paths:\n%s", cc, proc.stderr[-2000:])
                    return None
                os.replace(out, lib)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("building the cpu backend's native kernels failed: %s; using the pure-torch paths", exc)
            return None
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError as exc:
        logger.warning("loading %s failed: %s; using the pure-torch paths", lib, exc)
        return None
    fn = dll.accel_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int64, ctypes.c_float, ctypes.c_int,
                   ctypes.c_int]
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    signatures = {
        "accel_rms_norm_f32": (None, [ptr, i64, ptr, ptr, i64, i64, i64, f32, i32]),
        "accel_fused_add_rms_norm_f32": (None, [ptr, i64, ptr, i64, ptr, i64, i64, f32, i32]),
        "accel_rotary_f32": (ctypes.c_int, [ptr, ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, i64, i64, i64, i32]),
        "accel_write_kv": (ctypes.c_int, [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64]),
        "accel_bind_threads": (ctypes.c_int, [ptr, i32, i32]),
        "accel_gemv_f32": (ctypes.c_int, [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, i32]),
        "accel_panels_numel": (i64, [i64, i64]),
        "accel_pack_panels_f32": (None, [ptr, i64, i64, i64, ptr, i32]),
        "accel_gemm_panels_f32": (ctypes.c_int, [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i32]),
        "accel_panel_width": (i64, []),
        "accel_gemm_isa": (ctypes.c_char_p, []),
    }
    for name, (restype, argtypes) in signatures.items():
        f = getattr(dll, name)
        f.restype = restype
        f.argtypes = argtypes
    return dll


_BOUND: set[int] = set()


def bind_threads() -> int:
    """Pin the OpenMP worker threads of the calling thread's team (torch's intra-op threads) one per CPU,
    once per calling thread, as vLLM's CPU worker does (measured +3-5% decode throughput on the 2-core CI
    machine: workers stop migrating). The calling thread itself stays unpinned (its mask would pass to every
    process it starts later) unless ``ACCEL_CPU_BIND_THREADS=all``; ``ACCEL_CPU_BIND_THREADS=0`` turns
    pinning off. Skipped when torch uses more threads than the process may run on. Returns the number of
    threads pinned (0: not done)."""
    import threading

    import torch

    me = threading.get_ident()
    if me in _BOUND or os.environ.get("ACCEL_CPU_BIND_THREADS", "1") == "0":
        return 0
    _BOUND.add(me)
    lib = kernels()
    n = torch.get_num_threads()
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return 0
    if lib is None or n > len(cpus) or n < 1:
        return 0
    arr = (ctypes.c_int * n)(*cpus[:n])
    pin_master = os.environ.get("ACCEL_CPU_BIND_THREADS") == "all"
    pinned = int(lib.accel_bind_threads(arr, n, int(pin_master)))
    logger.info("pinned %d OpenMP threads to CPUs %s (ACCEL_CPU_BIND_THREADS=0 turns this off)", pinned, cpus[:n])
    return pinned
