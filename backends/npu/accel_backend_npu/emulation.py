"""EMULATION of the torch_npu functions this backend calls: plain torch on CPU, for tests without Ascend.

This is NOT torch_npu and says nothing about Ascend's numerics. Each function here is written from the op
documentation shipped in the torch-npu 2.13.0 wheel (``torch_npu/_op_plugin_docs.py``) and emulates only
the part of the op this backend uses; anything else (other layouts, quantized attention, mrope sections,
...) raises :class:`EmulationLimitError` instead of guessing. Where the documentation states a constraint
the real kernel enforces (dtypes, the 2048x2048 compressed causal mask, block sizes, index ranges), the
emulation enforces it too and raises :class:`EmulatedKernelError`, so a backend that breaks a documented
rule fails here rather than on hardware.

Every call is recorded (function name, positional and keyword argument *kinds*) in the instance's
``calls`` and in the process-wide :data:`CALL_LOG`, so a test can check each call against the schemas
of the real wheel (``tests/backends/npu``).

Use it by injection, never by patching ``sys.modules``::

    from accel_backend_npu import use_torch_npu
    from accel_backend_npu.emulation import TorchNpuEmulation
    with use_torch_npu(TorchNpuEmulation()):
        ops = accel_models.resolve_ops(backend="npu", allow_unavailable=True)

The instance's ``npu`` attribute stands in for ``torch_npu.npu``'s ACL graph API (``NPUGraph``, ``graph``,
streams): :mod:`accel_backend_npu.emulation_graph`, whose captures record the kernels called here.

Where the wheel's documentation is silent, the emulation makes a choice and says so in a comment marked
``ASSUMPTION`` (the README lists them).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from accel_backend_npu import emulation_graph

IS_EMULATION = True
__all__ = ["CALL_LOG", "EMULATED_FUNCTIONS", "EmulatedKernelError", "EmulationLimitError", "RecordedCall",
           "TorchNpuEmulation"]

_INT_MAX = 2147483647


class EmulatedKernelError(RuntimeError):
    """The call breaks a constraint the torch_npu documentation states for the real kernel."""


class EmulationLimitError(NotImplementedError):
    """The call uses a feature of the op that this emulation does not cover (it would only be a guess)."""


# ----------------------------------------------------------------------------------------------------
# call recording
# ----------------------------------------------------------------------------------------------------


def describe(value: Any) -> Any:
    """A hashable description of an argument's kind, enough to check it against a schema type."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return "Tensor"
    if isinstance(value, torch.dtype):
        return "dtype"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return ("list", tuple(describe(v) for v in value))
    return type(value).__name__


@dataclass(frozen=True)
class RecordedCall:
    """One call the backend made: the torch_npu function name and the kinds of its arguments."""

    name: str
    args: tuple[Any, ...]  # describe() of each positional argument
    kwargs: tuple[tuple[str, Any], ...]  # (keyword, describe(value)), sorted

    def __str__(self) -> str:
        parts = [str(a) for a in self.args] + [f"{k}={v}" for k, v in self.kwargs]
        return f"torch_npu.{self.name}({', '.join(parts)})"


#: Every call any emulation instance received in this process (deduplicated, in first-seen order).
CALL_LOG: dict[RecordedCall, None] = {}
_log_lock = threading.Lock()

#: name -> emulated function (plain functions with the op's Python signature).
EMULATED_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def _emulates(fn: Callable[..., Any]) -> Callable[..., Any]:
    EMULATED_FUNCTIONS[fn.__name__] = fn
    return fn


class TorchNpuEmulation:
    """A module-like stand-in for ``torch_npu`` whose functions are the CPU emulations in this module."""

    __name__ = "torch_npu EMULATION (accel_backend_npu.emulation, CPU)"
    IS_EMULATION = True

    def __init__(self, *, record_globally: bool = True) -> None:
        """``record_globally=False`` keeps the calls out of :data:`CALL_LOG` (tests that make deliberate
        bad calls, or call the emulation directly rather than through the backend)."""
        self.calls: list[RecordedCall] = []
        self.record_globally = record_globally
        for name, fn in EMULATED_FUNCTIONS.items():
            setattr(self, name, self._recording(name, fn))
        # torch_npu.npu's ACL graph API (NPUGraph, graph, streams), emulated in emulation_graph
        self.npu = emulation_graph.NpuNamespaceEmulation()

    def _recording(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            rec = RecordedCall(name, tuple(describe(a) for a in args),
                               tuple(sorted((k, describe(v)) for k, v in kwargs.items())))
            self.calls.append(rec)
            if self.record_globally:
                with _log_lock:
                    CALL_LOG.setdefault(rec, None)
            graph = emulation_graph.active_capture()
            if graph is not None:  # inside an emulated NPU graph capture: one recorded entry per kernel
                return graph.record_kernel(name, fn, args, kwargs)
            return fn(*args, **kwargs)

        return call

    def called(self) -> list[str]:
        """Names of the functions called so far, in order."""
        return [c.name for c in self.calls]

    def __getattr__(self, name: str) -> Any:  # only reached for functions not emulated
        raise AttributeError(f"the torch_npu EMULATION has no {name!r}: the backend calls a torch_npu function "
                             "nobody has emulated (add it to accel_backend_npu/emulation.py from the wheel's docs)")

    def __repr__(self) -> str:
        return f"<{self.__name__}: {len(self.calls)} calls>"


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise EmulatedKernelError(msg)


def _require_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...], op: str) -> None:
    _require(isinstance(t, torch.Tensor), f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    _require(t.dtype in allowed, f"{op}: {name} has dtype {t.dtype}; the op documents {allowed}")


def _no_extras(op: str, **given: Any) -> None:
    for k, v in given.items():
        if v is not None and v is not False:
            raise EmulationLimitError(f"{op}: the emulation does not cover {k}={v!r}")


# ----------------------------------------------------------------------------------------------------
# normalization and activations
# ----------------------------------------------------------------------------------------------------


@_emulates
def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06) -> tuple[torch.Tensor, torch.Tensor]:
    """Docs: y = x * rsqrt(mean(x^2) + eps) * gamma over gamma's dims; returns (y, rstd); 2-8 dims; gamma's
    dtype equals x's. ASSUMPTION: computed in float32 and rounded once to x's dtype."""
    op = "npu_rms_norm"
    _require_dtype("self", self, _FLOATS, op)
    _require(gamma.dtype == self.dtype, f"{op}: gamma dtype {gamma.dtype} must equal self's {self.dtype}")
    _require(2 <= self.dim() <= 8, f"{op}: self must have 2-8 dims, got {self.dim()}")
    nd = gamma.dim()
    _require(tuple(self.shape[-nd:]) == tuple(gamma.shape), f"{op}: gamma {tuple(gamma.shape)} must match the "
             f"trailing dims of self {tuple(self.shape)}")
    dims = tuple(range(-nd, 0))
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


@_emulates
def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor,
                     epsilon: float = 1e-06) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Docs (codegen schema): returns (y, rstd, x) with x = x1 + x2 and y = rms_norm(x) * gamma.
    ASSUMPTION: the sum is formed in float32, normalized from float32, and each output rounded once."""
    op = "npu_add_rms_norm"
    _require_dtype("x1", x1, _FLOATS, op)
    _require(x2.dtype == x1.dtype and gamma.dtype == x1.dtype, f"{op}: x1, x2, gamma must share a dtype")
    _require(x1.shape == x2.shape, f"{op}: x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} differ")
    xf = x1.float() + x2.float()
    nd = gamma.dim()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=tuple(range(-nd, 0)), keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x1.dtype), rstd, xf.to(x1.dtype)


@_emulates
def npu_swiglu(self: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Docs: split x in two halves A, B along dim; out = A * sigmoid(A) * B; 1-8 dims; fp32/fp16/bf16."""
    op = "npu_swiglu"
    _require_dtype("self", self, _FLOATS, op)
    _require(self.shape[dim] % 2 == 0, f"{op}: dim {dim} of size {self.shape[dim]} must be even")
    a, b = self.float().chunk(2, dim=dim)
    return (a * torch.sigmoid(a) * b).to(self.dtype)


@_emulates
def npu_gelu_mul(input: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """Docs: out = gelu(x[..., :d], approximate) * x[..., d:]; 2-8 dims; last dim even and <= 1024;
    product of the other dims <= 200000; approximate 'none' (erf) or 'tanh'."""
    op = "npu_gelu_mul"
    _require_dtype("input", input, _FLOATS, op)
    _require(2 <= input.dim() <= 8, f"{op}: input must have 2-8 dims, got {input.dim()}")
    last = input.shape[-1]
    _require(last % 2 == 0 and last <= 1024, f"{op}: last dim must be even and <= 1024, got {last}")
    _require(input.numel() // max(last, 1) <= 200000, f"{op}: product of the leading dims must be <= 200000")
    _require(approximate in ("none", "tanh"), f"{op}: approximate must be 'none' or 'tanh'")
    a, b = input.float().chunk(2, dim=-1)
    return (torch.nn.functional.gelu(a, approximate=approximate) * b).to(input.dtype)


# ----------------------------------------------------------------------------------------------------
# rotary
# ----------------------------------------------------------------------------------------------------


@_emulates
def npu_mrope(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
              head_size: int, *, mrope_section: list[int] | None = None, rotary_mode: str | None = "half",
              cache_mode: str | None = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """Docs: rope (1-D positions, mrope_section [0,0,0]) over 2-D query/key ``(T, heads*head_size)`` with a
    2-D ``cos_sin_cache (max_pos, rotary_dim)``; 'half' = rotate_half (GPT-NeoX), 'interleave' = GPT-J;
    cache_mode 'default' = cos and sin concatenated; rotary_dim a multiple of 32 (fp16/bf16) or 16 (fp32);
    positions out of range are an error. ASSUMPTION: with rotary_dim < head_size the leading rotary_dim
    dims of each head rotate and the rest pass through (as in vLLM's kernel this op mirrors)."""
    op = "npu_mrope"
    if positions.dim() != 1 or (mrope_section is not None and any(mrope_section)):
        raise EmulationLimitError(f"{op}: only rope mode (1-D positions, mrope_section [0, 0, 0]) is emulated")
    if cache_mode != "default":
        raise EmulationLimitError(f"{op}: only cache_mode='default' is emulated")
    _require(positions.dtype in (torch.int32, torch.int64), f"{op}: positions must be int32/int64")
    _require_dtype("query", query, _FLOATS, op)
    _require(key.dtype == query.dtype and cos_sin_cache.dtype == query.dtype,
             f"{op}: query, key and cos_sin_cache must share a dtype, got {query.dtype}, {key.dtype}, "
             f"{cos_sin_cache.dtype}")
    _require(query.dim() == 2 and key.dim() == 2 and cos_sin_cache.dim() == 2,
             f"{op}: query, key and cos_sin_cache must be 2-D")
    rotary_dim = cos_sin_cache.shape[1]
    align = 16 if query.dtype == torch.float32 else 32
    _require(rotary_dim % align == 0, f"{op}: rotary_dim {rotary_dim} must be a multiple of {align} for {query.dtype}")
    _require(rotary_dim <= head_size, f"{op}: rotary_dim {rotary_dim} exceeds head_size {head_size}")
    _require(rotary_mode in ("half", "interleave"), f"{op}: rotary_mode must be 'half' or 'interleave'")
    n = positions.shape[0]
    _require(query.shape[0] == n and key.shape[0] == n, f"{op}: query/key rows must equal len(positions)")
    if n and (int(positions.min()) < 0 or int(positions.max()) >= cos_sin_cache.shape[0]):
        raise EmulatedKernelError(f"{op}: positions out of range [0, {cos_sin_cache.shape[0]})")
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)  # [T, rotary_dim / 2] each
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(n, -1, head_size)
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        if rotary_mode == "half":
            a, b = rot.chunk(2, dim=-1)
            out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1).reshape(n, -1)

    return rotate(query), rotate(key)


# ----------------------------------------------------------------------------------------------------
# paged KV cache and attention
# ----------------------------------------------------------------------------------------------------


@_emulates
def npu_scatter_nd_update_(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """Docs: in place, input[indices[i]] = updates[i] where the last dim of indices (size a) indexes the
    first a dims of input; updates.shape == indices.shape[:-1] + input.shape[a:]; input and updates share a
    dtype; indices int32/int64, at least 2-D, never out of bounds."""
    op = "npu_scatter_nd_update_"
    _require(indices.dtype in (torch.int32, torch.int64), f"{op}: indices must be int32/int64, got {indices.dtype}")
    _require(indices.dim() >= 2, f"{op}: indices must be at least 2-D, got {indices.dim()}-D")
    a = indices.shape[-1]
    _require(a <= self.dim(), f"{op}: indices' last dim {a} exceeds input's {self.dim()} dims")
    expected = tuple(indices.shape[:-1]) + tuple(self.shape[a:])
    _require(tuple(updates.shape) == expected, f"{op}: updates {tuple(updates.shape)} must be {expected}")
    _require(updates.dtype == self.dtype, f"{op}: updates dtype {updates.dtype} must equal input's {self.dtype}")
    idx = indices.reshape(-1, a).long()
    for d in range(a):
        if idx.numel() and (int(idx[:, d].min()) < 0 or int(idx[:, d].max()) >= self.shape[d]):
            raise EmulatedKernelError(f"{op}: indices out of bounds for dim {d} of size {self.shape[d]}")
    self[tuple(idx.unbind(-1))] = updates.reshape((-1,) + tuple(self.shape[a:]))
    return self


_FIA_KNOWN_OPTIONAL = frozenset({
    "pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
    "antiquant_scale", "antiquant_offset", "query_padding_size", "kv_padding_size", "key_antiquant_scale",
    "key_antiquant_offset", "value_antiquant_scale", "value_antiquant_offset", "key_shared_prefix",
    "value_shared_prefix", "actual_shared_prefix_len", "query_rope", "key_rope", "key_rope_antiquant_scale",
    "antiquant_mode", "key_antiquant_mode", "value_antiquant_mode",
})


def _check_compressed_causal_mask(op: str, mask: torch.Tensor | None, sparse_mode: int) -> None:
    # Docs: sparse_mode 2/3/4 take the "optimized" 2048x2048 lower-triangular mask ((S,S), (1,S,S) or
    # (1,1,S,S), S fixed to 2048; bool/int8/uint8; True/1 = masked out) and the user must guarantee it.
    _require(mask is not None, f"{op}: sparse_mode={sparse_mode} needs the compressed 2048x2048 atten_mask")
    assert mask is not None
    _require(mask.dtype in (torch.bool, torch.int8, torch.uint8), f"{op}: atten_mask must be bool/int8/uint8")
    _require(tuple(mask.shape[-2:]) == (2048, 2048) and mask.dim() in (2, 3, 4) and mask.numel() == 2048 * 2048,
             f"{op}: sparse_mode={sparse_mode} needs atten_mask of shape (2048, 2048), got {tuple(mask.shape)}")
    expected = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=mask.device), diagonal=1)
    _require(torch.equal(mask.reshape(2048, 2048).bool(), expected),
             f"{op}: atten_mask must be triu(ones(2048, 2048), diagonal=1) (1 = masked), as the docs require")


@_emulates
def npu_fused_infer_attention_score(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, atten_mask: torch.Tensor | None = None,
    actual_seq_lengths: list[int] | None = None, actual_seq_lengths_kv: list[int] | None = None,
    block_table: torch.Tensor | None = None, num_heads: int = 1, scale: float = 1.0,
    pre_tokens: int = _INT_MAX, next_tokens: int = _INT_MAX, input_layout: str = "BSH",
    num_key_value_heads: int = 0, sparse_mode: int = 0, inner_precise: int = 0, block_size: int = 0,
    softmax_lse_flag: bool = False, **others: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Emulated: input_layout "TND" with page attention (block_table, key/value ``(blocknum, block_size,
    KV_N * D)``). From the docs: attention_out = softmax(scale * q k^T + mask) v; TND needs
    ``actual_seq_lengths`` as the cumulative query lengths (one per batch, non-decreasing, last = T);
    with page attention ``actual_seq_lengths_kv`` holds each batch's KV length; GQA needs num_heads a
    multiple of num_key_value_heads (ratio <= 64); query float16/bfloat16/int8 (no float32);
    block_size a multiple of 128 in [128, 512] when some query length exceeds 1 (16-aligned, <= 512
    otherwise); block_table's second dim >= the most blocks any batch needs.
    Masking: when every query length is 1 (IncreFlashAttention branch) sparse_mode, pre_tokens and
    next_tokens are ignored and each query sees its whole KV. Otherwise sparse_mode 0 without a mask is
    full attention; 3 is rightDownCausal (row i of a batch with q_len queries and kv_len keys sees keys
    j <= i + kv_len - q_len); 4 is band with the same right-down origin (sees i' - pre_tokens <= j <=
    i' + next_tokens, i' = i + kv_len - q_len); both need the compressed 2048x2048 mask.
    ASSUMPTION: TND's "Q_S == 1" branch is taken when every batch's query length is 1; a fully masked
    row yields zeros; softmax_lse is the documented [1] zero tensor (softmax_lse_flag=False only)."""
    op = "npu_fused_infer_attention_score"
    unknown = set(others) - _FIA_KNOWN_OPTIONAL
    if unknown:
        raise TypeError(f"{op}() got unexpected keyword argument(s) {sorted(unknown)}")
    _no_extras(op, softmax_lse_flag=softmax_lse_flag,
               **{k: v for k, v in others.items() if not (isinstance(v, int) and not isinstance(v, bool) and v == 0)})
    if input_layout != "TND" or block_table is None:
        raise EmulationLimitError(f"{op}: only input_layout='TND' with page attention (block_table) is emulated")
    _require_dtype("query", query, _HALF, op)
    _require(query.is_contiguous(), f"{op}: query must be contiguous")
    _require(key.dtype == query.dtype and value.dtype == query.dtype, f"{op}: key/value dtype must equal query's")
    _require(query.dim() == 3, f"{op}: TND query must be 3-D, got {tuple(query.shape)}")
    t, n, d = query.shape
    _require(n == num_heads, f"{op}: num_heads={num_heads} but query has {n} heads")
    kv_n = num_key_value_heads or num_heads
    _require(num_heads % kv_n == 0 and num_heads // kv_n <= 64,
             f"{op}: num_heads {num_heads} must be a multiple of num_key_value_heads {kv_n}, ratio <= 64")
    _require(d % 16 == 0, f"{op}: D={d} must be 16-aligned for float16/bfloat16")
    if key.dim() != 3:
        raise EmulationLimitError(f"{op}: only the (blocknum, block_size, H) page-attention cache is emulated")
    _require(key.shape == value.shape, f"{op}: key and value shapes differ")
    n_blocks, bs, h = key.shape
    _require(bs == block_size, f"{op}: block_size={block_size} but the cache has blocks of {bs}")
    _require(h == kv_n * d, f"{op}: cache H={h} must be num_key_value_heads*D={kv_n * d}")
    _require(isinstance(actual_seq_lengths, (list, tuple)) and isinstance(actual_seq_lengths_kv, (list, tuple)),
             f"{op}: TND with page attention needs actual_seq_lengths and actual_seq_lengths_kv (int lists)")
    assert actual_seq_lengths is not None and actual_seq_lengths_kv is not None
    batch = len(actual_seq_lengths)
    cum = [0, *actual_seq_lengths]
    q_lens = [cum[i + 1] - cum[i] for i in range(batch)]
    _require(all(q >= 0 for q in q_lens), f"{op}: TND actual_seq_lengths must be non-decreasing (cumulative)")
    _require(cum[-1] == t, f"{op}: TND actual_seq_lengths must end at T={t}, ends at {cum[-1]}")
    _require(len(actual_seq_lengths_kv) == batch, f"{op}: actual_seq_lengths_kv must have one entry per batch")
    _require(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == batch,
             f"{op}: block_table must be an int32 [B={batch}, max_blocks] tensor")
    incre = max(q_lens, default=0) <= 1
    if incre:
        _require(bs % 16 == 0 and bs <= 512, f"{op}: block_size must be 16-aligned and <= 512")
    else:
        _require(bs % 128 == 0 and 128 <= bs <= 512, f"{op}: block_size must be a multiple of 128 in [128, 512]")
    need = max((math.ceil(k / bs) for k in actual_seq_lengths_kv), default=0)
    _require(block_table.shape[1] >= need, f"{op}: block_table has {block_table.shape[1]} columns, needs {need}")
    if not incre:
        if sparse_mode in (3, 4):
            _check_compressed_causal_mask(op, atten_mask, sparse_mode)
        elif sparse_mode == 0:
            if atten_mask is not None:
                raise EmulationLimitError(f"{op}: sparse_mode=0 with a full atten_mask is not emulated")
        else:
            raise EmulationLimitError(f"{op}: sparse_mode={sparse_mode} is not emulated")

    out = torch.zeros_like(query)
    keys = key.view(n_blocks * bs, kv_n, d)
    values = value.view(n_blocks * bs, kv_n, d)
    group = num_heads // kv_n
    for b in range(batch):
        q_len, kv_len = q_lens[b], int(actual_seq_lengths_kv[b])
        if q_len == 0 or kv_len == 0:
            continue
        blocks = block_table[b, : math.ceil(kv_len / bs)].long()
        _require(bool((blocks >= 0).all()) and bool((blocks < n_blocks).all()), f"{op}: block id out of range")
        slots = (blocks[:, None] * bs + torch.arange(bs)[None, :]).reshape(-1)[:kv_len]
        k = keys[slots].float().repeat_interleave(group, dim=1)  # [kv, N, D]
        v = values[slots].float().repeat_interleave(group, dim=1)
        q = query[cum[b] : cum[b + 1]].float()  # [q, N, D]
        scores = scale * torch.einsum("qnd,knd->nqk", q, k)
        if not incre and sparse_mode in (3, 4):
            diag = torch.arange(q_len)[:, None] + (kv_len - q_len)
            j = torch.arange(kv_len)[None, :]
            visible = j <= diag if sparse_mode == 3 else (j >= diag - pre_tokens) & (j <= diag + next_tokens)
            scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row -> zeros
        out[cum[b] : cum[b + 1]] = torch.einsum("nqk,knd->qnd", probs, v).to(query.dtype)
    return out, torch.zeros(1, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# MoE routing and experts
# ----------------------------------------------------------------------------------------------------


def _stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # ASSUMPTION: ties go to the lower expert id (the docs do not say).
    idx = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
    return x.gather(-1, idx), idx


@_emulates
def npu_moe_gating_top_k_softmax(x: torch.Tensor, finished: torch.Tensor | None = None,
                                 k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Docs: y, expert_idx = topk(softmax(x), k) over the last dim (y in x's dtype, expert_idx int32),
    row_idx[i, j] = j * num_rows + i (int32); x 2-D/3-D fp16/bf16/fp32; 0 < k <= min(E, 1024)."""
    op = "npu_moe_gating_top_k_softmax"
    _require_dtype("x", x, _FLOATS, op)
    _require(x.dim() in (2, 3), f"{op}: x must be 2-D or 3-D")
    _require(0 < k <= min(x.shape[-1], 1024), f"{op}: need 0 < k <= min(num_experts, 1024), got k={k}")
    if finished is not None:
        raise EmulationLimitError(f"{op}: finished is not emulated")
    y, idx = _stable_topk(torch.softmax(x.float(), dim=-1), k)
    rows = x.numel() // x.shape[-1]
    row_idx = torch.arange(rows * k, dtype=torch.int32).view(k, rows).t().reshape(idx.shape)
    return y.to(x.dtype), idx.to(torch.int32), row_idx


@_emulates
def npu_moe_gating_top_k(x: torch.Tensor, k: int, *, bias: torch.Tensor | None = None,
                         input_ids: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None,
                         k_group: int = 1, group_count: int = 1, group_select_mode: int = 0, renorm: int = 0,
                         norm_type: int = 0, out_flag: bool = False, routed_scaling_factor: float = 1.0,
                         eps: float = 1e-20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Docs: norm = softmax (norm_type 0) or sigmoid (1) of x (float32 out); choice = norm + bias; experts
    split in group_count groups scored by their max (group_select_mode 0) or top-2 sum (1); the k_group
    best groups are eligible; expert_idx = top-k of the eligible choices (int32). renorm only 0; E <= 2048;
    E % group_count == 0 with E / group_count > 2 and align32(E / group_count) * group_count <= 2048;
    1 <= k_group <= group_count; 1 <= k <= E / group_count * k_group; bias 1-D [E] of x's dtype.
    ASSUMPTION (docs give no formula for y_out): y_out = norm[expert_idx], divided by (sum + eps) when
    norm_type is 1, times routed_scaling_factor. The backend does not read y_out, only expert_idx and the
    norm output (out_flag=True), whose meaning the docs state."""
    op = "npu_moe_gating_top_k"
    _require_dtype("x", x, _FLOATS, op)
    _no_extras(op, input_ids=input_ids, tid2eid=tid2eid)
    _require(x.dim() == 2, f"{op}: x must be 2-D")
    e = x.shape[-1]
    _require(e <= 2048, f"{op}: at most 2048 experts")
    _require(renorm == 0, f"{op}: renorm only supports 0")
    _require(norm_type in (0, 1) and group_select_mode in (0, 1), f"{op}: norm_type/group_select_mode must be 0/1")
    _require(group_count > 0 and e % group_count == 0 and e // group_count > 2
             and math.ceil(e / group_count / 32) * 32 * group_count <= 2048,
             f"{op}: group_count={group_count} does not satisfy the documented constraints for {e} experts")
    _require(1 <= k_group <= group_count, f"{op}: need 1 <= k_group <= group_count")
    _require(1 <= k <= e // group_count * k_group, f"{op}: need 1 <= k <= E / group_count * k_group")
    if bias is not None:
        _require(bias.dtype == x.dtype and tuple(bias.shape) == (e,), f"{op}: bias must be [E] of x's dtype")
    norm = torch.softmax(x.float(), dim=-1) if norm_type == 0 else torch.sigmoid(x.float())
    choice = norm if bias is None else norm + bias.float()
    if group_count > 1:
        grouped = choice.view(x.shape[0], group_count, -1)
        gscore = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, dim=-1).values.sum(-1)
        _, top_groups = _stable_topk(gscore, k_group)
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, top_groups, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // group_count, dim=1), float("-inf"))
    _, idx = _stable_topk(choice, k)
    y = norm.gather(1, idx)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    return y.to(x.dtype), idx.to(torch.int32), (norm if out_flag else torch.empty(0))


@_emulates
def npu_moe_init_routing(x: torch.Tensor, row_idx: torch.Tensor, expert_idx: torch.Tensor,
                         active_num: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Docs: expanded_expert_idx, sorted_row_idx = keyValueSort(expert_idx, row_idx);
    expanded_row_idx[sorted_row_idx[i]] = i; expanded_x[i] = x[sorted_row_idx[i] % num_rows], with
    min(num_rows, active_num) * k valid rows; row_idx, expert_idx int32 (num_rows, k).
    ASSUMPTION: the sort is stable over expert_idx in row-major order."""
    op = "npu_moe_init_routing"
    _require_dtype("x", x, _FLOATS, op)
    _require(x.dim() == 2 and expert_idx.dim() == 2 and row_idx.shape == expert_idx.shape,
             f"{op}: x must be (num_rows, H) and row_idx, expert_idx (num_rows, k)")
    _require(row_idx.dtype == torch.int32 and expert_idx.dtype == torch.int32, f"{op}: row_idx/expert_idx int32")
    num_rows, k = expert_idx.shape
    _require(x.shape[0] == num_rows, f"{op}: x has {x.shape[0]} rows, expert_idx {num_rows}")
    flat_e = expert_idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    expanded_expert_idx = flat_e[order]
    sorted_row_idx = row_idx.reshape(-1)[order].long()
    expanded_row_idx = torch.empty(num_rows * k, dtype=torch.int32)
    expanded_row_idx[sorted_row_idx] = torch.arange(num_rows * k, dtype=torch.int32)
    valid = min(num_rows, active_num) * k
    expanded_x = x[sorted_row_idx[:valid] % num_rows]
    return expanded_x, expanded_row_idx, expanded_expert_idx.to(torch.int32)


@_emulates
def npu_moe_compute_expert_tokens(sorted_expert_for_source_row: torch.Tensor, num_expert: int) -> torch.Tensor:
    """Docs: for each expert i in [0, num_expert) a binary search for the end of its rows in the sorted,
    non-decreasing 1-D int32 input (values in [0, num_expert - 1], fewer than 2^24 rows; num_expert in
    (0, 2048]). Output [num_expert] int32. ASSUMPTION: the end is exclusive, i.e. the cumulative row count
    (what vllm-ascend feeds to npu_grouped_matmul as a group_list_type=0 cumsum)."""
    op = "npu_moe_compute_expert_tokens"
    s = sorted_expert_for_source_row
    _require(s.dtype == torch.int32 and s.dim() == 1, f"{op}: input must be a 1-D int32 tensor")
    _require(0 < num_expert <= 2048, f"{op}: num_expert must be in (0, 2048]")
    if s.numel():
        _require(bool((s[1:] >= s[:-1]).all()), f"{op}: input must be sorted non-decreasing")
        _require(int(s.min()) >= 0 and int(s.max()) < num_expert, f"{op}: values must be in [0, num_expert)")
    return torch.searchsorted(s, torch.arange(num_expert, dtype=torch.int32), right=True).to(torch.int32)


@_emulates
def npu_grouped_matmul(x: list[torch.Tensor], weight: list[torch.Tensor], *, bias: Any = None, scale: Any = None,
                       offset: Any = None, antiquant_scale: Any = None, antiquant_offset: Any = None,
                       per_token_scale: Any = None, group_list: torch.Tensor | None = None,
                       activation_input: Any = None, activation_quant_scale: Any = None,
                       activation_quant_offset: Any = None, split_item: int = 0, group_type: int | None = None,
                       group_list_type: int = 0, act_type: int = 0, tuning_config: Any = None,
                       output_dtype: Any = None, **dtypes: Any) -> list[torch.Tensor]:
    """Emulated: the unquantized "single-single-single" case: group_type=0 (split the m axis),
    split_item 2/3 (one output), x = [x (m, k)], weight = [w (g, k, n)] (3-D; a transposed view is allowed),
    group_list an int64 tensor of g cumulative ends (group_list_type 0, last = m) or sizes (1, sum = m),
    at most 1024 groups: y[rows of group i] = x[rows] @ w[i]; output in x's dtype.
    ASSUMPTION: accumulation in float32, rounded once."""
    op = "npu_grouped_matmul"
    _no_extras(op, bias=bias, scale=scale, offset=offset, antiquant_scale=antiquant_scale,
               antiquant_offset=antiquant_offset, per_token_scale=per_token_scale, activation_input=activation_input,
               activation_quant_scale=activation_quant_scale, activation_quant_offset=activation_quant_offset,
               tuning_config=tuning_config, output_dtype=output_dtype, act_type=act_type or None,
               **{k: v for k, v in dtypes.items()})
    if group_type != 0 or split_item not in (2, 3) or len(x) != 1 or len(weight) != 1:
        raise EmulationLimitError(f"{op}: only group_type=0, split_item 2/3, one x and one 3-D weight are emulated")
    xs, w = x[0], weight[0]
    _require_dtype("x[0]", xs, _FLOATS, op)
    _require(w.dtype == xs.dtype, f"{op}: weight dtype {w.dtype} must equal x's {xs.dtype} (unquantized)")
    _require(xs.dim() == 2 and w.dim() == 3 and w.shape[1] == xs.shape[1],
             f"{op}: need x (m, k) and weight (g, k, n); got {tuple(xs.shape)} and {tuple(w.shape)}")
    _require(xs.stride(-1) == 1, f"{op}: x must not be transposed")
    _require(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64 and group_list.dim() == 1,
             f"{op}: group_list must be a 1-D int64 tensor")
    assert group_list is not None
    g = w.shape[0]
    _require(group_list.shape[0] == g and g <= 1024, f"{op}: group_list needs one entry per group (<= 1024)")
    _require(group_list_type in (0, 1), f"{op}: group_list_type must be 0 or 1")
    ends = group_list if group_list_type == 0 else torch.cumsum(group_list, 0)
    _require(bool((ends[1:] >= ends[:-1]).all()) and int(ends[0]) >= 0 if g else True,
             f"{op}: group_list must describe non-negative groups")
    _require(int(ends[-1]) == xs.shape[0] if g else True, f"{op}: the groups must cover x's {xs.shape[0]} rows")
    y = torch.empty((xs.shape[0], w.shape[2]), dtype=xs.dtype)
    start = 0
    for i, end in enumerate(ends.tolist()):
        y[start:end] = (xs[start:end].float() @ w[i].float()).to(xs.dtype)
        start = end
    return [y]


@_emulates
def npu_moe_finalize_routing(expanded_permuted_rows: torch.Tensor, skip1: torch.Tensor | None,
                             skip2: torch.Tensor | None, bias: torch.Tensor | None, scales: torch.Tensor | None,
                             expanded_src_to_dst_row: torch.Tensor, export_for_source_row: torch.Tensor | None,
                             drop_pad_mode: int | None = 0, k: int | None = 1) -> torch.Tensor:
    """Docs: out[i] = skip1[i] + skip2[i] + sum_k scales[i, k] * (rows[src_to_dst[i + k * num_rows]]
    + bias[expert[i, k]]); rows (num_rows * K, H) fp16/bf16/fp32; scales (num_rows, K) of rows' dtype;
    src_to_dst int32 (num_rows * K,); skip2 None requires skip1 None; drop_pad_mode only 0.
    ASSUMPTION: the weighted sum accumulates in float32 and is rounded once."""
    op = "npu_moe_finalize_routing"
    _require_dtype("expanded_permuted_rows", expanded_permuted_rows, _FLOATS, op)
    _require(not (skip2 is None and skip1 is not None), f"{op}: skip1 must be None when skip2 is None")
    _require(drop_pad_mode in (0, None), f"{op}: drop_pad_mode only supports 0")
    _require(expanded_src_to_dst_row.dtype == torch.int32, f"{op}: expanded_src_to_dst_row must be int32")
    rows = expanded_permuted_rows
    if scales is not None:
        _require(scales.dtype == rows.dtype and scales.dim() == 2, f"{op}: scales must be 2-D of rows' dtype")
        num_rows, kk = scales.shape
    else:
        kk = int(k or 1)
        num_rows = expanded_src_to_dst_row.shape[0] // kk
    _require(expanded_src_to_dst_row.shape[0] == num_rows * kk, f"{op}: src_to_dst must have num_rows*K entries")
    dst = expanded_src_to_dst_row.long().view(kk, num_rows).t()  # [num_rows, K]
    gathered = rows.float()[dst]  # [num_rows, K, H]
    if bias is not None:
        _require(export_for_source_row is not None, f"{op}: bias needs export_for_source_row")
        assert export_for_source_row is not None
        gathered = gathered + bias.float()[export_for_source_row.long()]
    w = scales.float() if scales is not None else torch.ones(num_rows, kk)
    out = (gathered * w[..., None]).sum(1)
    for s in (skip1, skip2):
        if s is not None:
            out = out + s.float()
    return out.to(rows.dtype)


# ----------------------------------------------------------------------------------------------------
# W8A8
# ----------------------------------------------------------------------------------------------------


@_emulates
def npu_dynamic_quant(input: torch.Tensor, *, smooth_scales: torch.Tensor | None = None,
                      group_index: torch.Tensor | None = None, dst_type: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Docs: per-token symmetric: scale = rowMax(|x|) / DTYPE_MAX (127 for int8), y = round(x / scale);
    x float16/bfloat16, more than 1-D; scale float32 of x's shape without the last dim.
    ASSUMPTION: round half to even; an all-zero row gives scale 0 and y 0."""
    op = "npu_dynamic_quant"
    _no_extras(op, smooth_scales=smooth_scales, group_index=group_index)
    if dst_type not in (None, torch.int8):
        raise EmulationLimitError(f"{op}: only int8 output is emulated")
    _require_dtype("input", input, _HALF, op)
    _require(input.dim() > 1, f"{op}: input must have more than one dim")
    xf = input.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.where(scale[..., None] > 0, torch.round(xf / safe[..., None]), torch.zeros_like(xf))
    return y.clamp(-128, 127).to(torch.int8), scale


@_emulates
def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *, offset: torch.Tensor | None = None,
                     pertoken_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     output_dtype: Any = None, **dtypes: Any) -> torch.Tensor:
    """Emulated: int8 x int8 with a per-channel float32/bfloat16 ``scale`` (n,) or (1,) and a per-token
    float32 ``pertoken_scale`` (m,), output bfloat16 or float16 (the documented combinations):
    out = (x1 @ x2) * scale * pertoken_scale; x2 is (k, n) (a transposed (n, k) view is allowed).
    ASSUMPTION: exact int32 accumulation, scaling in float32, one rounding. ``bias`` is not emulated (the
    docs do not say where a floating bias enters the formula)."""
    op = "npu_quant_matmul"
    _no_extras(op, offset=offset, bias=bias, **dtypes)
    _require(x1.dtype == torch.int8 and x2.dtype == torch.int8, f"{op}: only int8 x1/x2 are emulated")
    _require(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0],
             f"{op}: need x1 (m, k) and x2 (k, n); got {tuple(x1.shape)} and {tuple(x2.shape)}")
    m, n = x1.shape[0], x2.shape[1]
    out_dtype = torch.int8 if output_dtype is None else output_dtype
    if out_dtype not in (torch.bfloat16, torch.float16) or pertoken_scale is None:
        raise EmulationLimitError(f"{op}: only per-token scaled bfloat16/float16 output is emulated")
    _require(scale.dim() == 1 and scale.shape[0] in (1, n), f"{op}: scale must be (1,) or (n={n},)")
    _require(scale.dtype == torch.float32 or (scale.dtype == torch.bfloat16 and out_dtype == torch.bfloat16),
             f"{op}: scale dtype {scale.dtype} is not documented for output {out_dtype}")
    _require(pertoken_scale.dtype == torch.float32 and tuple(pertoken_scale.shape) == (m,),
             f"{op}: pertoken_scale must be float32 (m={m},)")
    acc = (x1.to(torch.int32) @ x2.to(torch.int32)).to(torch.float32)
    return (acc * scale.float()[None, :] * pertoken_scale[:, None]).to(out_dtype)
