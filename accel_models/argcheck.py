"""Argument checks backends share, so every backend rejects bad input with the same ValueError naming the
argument and what is supported.

Each ``check_*`` function raises :class:`ValueError` for arguments the hookspecs in
``accel_models/hookspecs.py`` do not allow (wrong dtype, rank or shape, an unknown option) and otherwise
returns ``None`` or the sizes it read. They are pure functions over shapes, dtypes and Python values: no
device work, no host synchronization, cheap enough to run on every call (and under CUDA graph capture).

A backend passes the dtypes its kernels take (``dtypes``) and its name (``backend``), so a message says
"the npu backend supports float32, float16, bfloat16"; limits only one backend has (a block size, a head
size, a dtype one kernel refuses) stay in that backend, after these checks::

    from accel_models import argcheck

    @hookimpl
    def accel_rms_norm(x, weight, eps):
        argcheck.check_rms_norm(x, weight, dtypes=MY_FLOATS, backend="mychip")
        ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "FLOATS", "check_activation", "check_allocate_kv_cache", "check_approximate", "check_dtype",
    "check_dynamic_int8_quant", "check_float", "check_fused_add_rms_norm", "check_fused_experts", "check_gated",
    "check_index", "check_int8_scaled_mm", "check_linear", "check_prepare_linear", "check_moe_topk", "check_paged_attention", "check_paged_attention_lengths", "check_rms_norm",
    "check_rotary_embedding", "check_tensor", "check_write_kv_cache", "dtype_names",
    "check_rope_and_write_kv_cache", "check_act_and_mul_linear", "ACT_AND_MUL_ACTIVATIONS", "check_argmax",
]

#: Every float dtype the hookspecs allow (the reference backend takes all of them).
FLOATS: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    """``"float32, float16, bfloat16"`` for those dtypes."""
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _shape(t: Any) -> Any:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_tensor(name: str, t: Any) -> None:
    """``t`` is a tensor."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t: Any, dtypes: Sequence[torch.dtype] = FLOATS, backend: str | None = None) -> None:
    """``t`` is a tensor of one of ``dtypes``."""
    check_tensor(name, t)
    if t.dtype not in dtypes:
        who = f"the {backend} backend supports" if backend else "supported:"
        raise ValueError(f"{name} has dtype {t.dtype}; {who} {dtype_names(dtypes)}")


def check_dtype(what: str, dtype: torch.dtype, dtypes: Sequence[torch.dtype] = FLOATS,
                backend: str | None = None) -> None:
    """A dtype argument (``out_dtype``, a KV-cache dtype) is one of ``dtypes``."""
    if dtype not in dtypes:
        by = f" by the {backend} backend" if backend else ""
        raise ValueError(f"{what} {dtype} is not supported{by}; supported: {dtype_names(dtypes)}")


def check_index(name: str, t: Any, dtype: torch.dtype, ndim: int) -> None:
    """``t`` is an ``ndim``-D index tensor of ``dtype`` (positions, slot_mapping, block_table, ...)."""
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != ndim:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {ndim}-D {dtype} tensor, got {got}")


def check_approximate(approximate: str) -> None:
    """gelu_and_mul's ``approximate``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def check_activation(activation: str) -> None:
    """fused_experts' ``activation``."""
    if activation not in ("silu", "gelu"):
        raise ValueError(f"activation must be 'silu' or 'gelu', got {activation!r}")


# ----------------------------------------------------------------------------------------------------
# per op: the checks of the hookspec, in the order the reference makes them
# ----------------------------------------------------------------------------------------------------


def check_rms_norm(x: Any, weight: Any, dtypes: Sequence[torch.dtype] = FLOATS, backend: str | None = None) -> None:
    """rms_norm: float ``x`` and ``weight [hidden]``."""
    check_float("x", x, dtypes, backend)
    check_float("weight", weight, dtypes, backend)
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({x.shape[-1] if x.dim() else '?'},) "
                         f"for x {tuple(x.shape)}")


def check_fused_add_rms_norm(x: Any, residual: Any, weight: Any, dtypes: Sequence[torch.dtype] = FLOATS,
                             backend: str | None = None) -> None:
    """fused_add_rms_norm: rms_norm's checks and a float ``residual`` of ``x``'s shape."""
    check_rms_norm(x, weight, dtypes, backend)
    check_float("residual", residual, dtypes, backend)
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}; expected x's shape {tuple(x.shape)}")


def check_gated(x: Any, dtypes: Sequence[torch.dtype] = FLOATS, backend: str | None = None) -> None:
    """silu_and_mul / gelu_and_mul: float ``x [..., 2 * d]``."""
    check_float("x", x, dtypes, backend)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must be even ([..., 2 * d]), got shape {tuple(x.shape)}")


def check_rotary_embedding(positions: Any, query: Any, key: Any, cos_sin_cache: Any, head_size: int,
                           rotary_dim: int, dtypes: Sequence[torch.dtype] = FLOATS,
                           backend: str | None = None) -> int:
    """rotary_embedding: index, dtype and shape checks (not the positions' values); returns num_tokens."""
    check_index("positions", positions, torch.int64, 1)
    check_float("query", query, dtypes, backend)
    check_float("cos_sin_cache", cos_sin_cache, dtypes, backend)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_size:
        raise ValueError(f"rotary_dim must be even and in (0, head_size={head_size}], got {rotary_dim}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rotary_dim:
        raise ValueError(f"cos_sin_cache must be [max_position, rotary_dim={rotary_dim}], got {tuple(cos_sin_cache.shape)}")
    num_tokens = positions.shape[0]
    for name, t in (("query", query), ("key", key)):
        if t is None:
            continue
        check_tensor(name, t)
        # [T, heads * head_size] or [T, heads, head_size] (checked without dividing by T, which may be 0)
        if (t.dim() not in (2, 3) or t.shape[0] != num_tokens or t.shape[-1] % head_size
                or (t.dim() == 3 and t.shape[-1] != head_size)):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{num_tokens}, heads * {head_size}] "
                             f"or [{num_tokens}, heads, {head_size}]")
    return num_tokens


def check_allocate_kv_cache(num_blocks: int, block_size: int, block_sizes: Sequence[int], backend: str) -> None:
    """allocate_kv_cache: a block size the backend's layout declares and a positive block count."""
    if block_size not in block_sizes:
        raise ValueError(f"block_size {block_size} is not supported by the {backend} backend; supported: "
                         f"{tuple(block_sizes)}")
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")


def check_write_kv_cache(key: Any, value: Any, slot_mapping: Any, num_kv_heads: int, head_size: int) -> None:
    """write_kv_cache (after the backend checked its cache layout): ``slot_mapping [T]`` int64 and
    ``key``, ``value`` ``[T, num_kv_heads, head_size]``."""
    check_index("slot_mapping", slot_mapping, torch.int64, 1)
    expected = (slot_mapping.shape[0], num_kv_heads, head_size)
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected:
            raise ValueError(f"{name} has shape {_shape(t)}; expected {expected} for this cache and slot_mapping")


def check_paged_attention(query: Any, block_table: Any, seq_lens: Any, query_start_loc: Any, num_kv_heads: int,
                          head_size: int) -> int:
    """paged_attention (after the backend checked the query's dtype and its cache layout): index tensors and
    how ``query [tokens, heads, head_size]`` fits the cache; returns the batch size."""
    check_index("block_table", block_table, torch.int32, 2)
    check_index("seq_lens", seq_lens, torch.int32, 1)
    check_index("query_start_loc", query_start_loc, torch.int32, 1)
    if query.dim() != 3 or query.shape[2] != head_size or query.shape[1] % num_kv_heads:
        raise ValueError(f"query [tokens, heads, head_size] = {tuple(query.shape)} does not fit a cache of "
                         f"{num_kv_heads} KV heads of size {head_size} (heads must be a multiple of KV heads)")
    batch = seq_lens.shape[0]
    if query_start_loc.shape[0] != batch + 1 or block_table.shape[0] != batch:
        raise ValueError(f"query_start_loc must be [B+1] and block_table [B, *] for seq_lens [B={batch}], got "
                         f"{tuple(query_start_loc.shape)} and {tuple(block_table.shape)}")
    return batch


def check_moe_topk(router_logits: Any, top_k: int, scoring_func: str, num_expert_group: int | None,
                   topk_group: int | None, e_score_correction_bias: Any, dtypes: Sequence[torch.dtype] = FLOATS,
                   backend: str | None = None) -> tuple[int, int, bool]:
    """moe_topk: returns ``(num_tokens, num_experts, grouped)`` (grouped: grouped top-k is asked for)."""
    check_float("router_logits", router_logits, dtypes, backend)
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be 2-D [num_tokens, num_experts], got {tuple(router_logits.shape)}")
    num_tokens, num_experts = router_logits.shape
    if e_score_correction_bias is not None and _shape(e_score_correction_bias) != (num_experts,):
        raise ValueError(f"e_score_correction_bias must be [num_experts={num_experts}], "
                         f"got {_shape(e_score_correction_bias)}")
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if scoring_func not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
    grouped = num_expert_group is not None and num_expert_group > 1
    if grouped:
        assert num_expert_group is not None
        if num_experts % num_expert_group or topk_group is None or not 0 < topk_group <= num_expert_group:
            raise ValueError(f"grouped top-k needs num_experts ({num_experts}) divisible by num_expert_group "
                             f"({num_expert_group}) and 0 < topk_group ({topk_group}) <= num_expert_group")
        eligible = topk_group * (num_experts // num_expert_group)
        if top_k > eligible:
            raise ValueError(f"top_k={top_k} exceeds the {eligible} experts of the topk_group={topk_group} groups "
                             "eligible in grouped top-k")
    return num_tokens, num_experts, grouped


def check_fused_experts(hidden_states: Any, w13: Any, w2: Any, topk_weights: Any, topk_ids: Any, activation: str,
                        expert_map: Any, dtypes: Sequence[torch.dtype] = FLOATS,
                        backend: str | None = None) -> tuple[int, int, int, int]:
    """fused_experts: returns ``(num_tokens, hidden, num_local_experts, intermediate)``."""
    check_float("hidden_states", hidden_states, dtypes, backend)
    check_index("topk_ids", topk_ids, torch.int32, 2)
    check_tensor("topk_weights", topk_weights)
    check_activation(activation)
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be 2-D [num_tokens, hidden], got {tuple(hidden_states.shape)}")
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.dtype != hidden_states.dtype:
            got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{name} must be a 3-D tensor of hidden_states' dtype {hidden_states.dtype}, got {got}")
    num_tokens, hidden = hidden_states.shape
    num_local, two_inter, w13_hidden = w13.shape
    if w13_hidden != hidden or two_inter % 2 or tuple(w2.shape) != (num_local, hidden, two_inter // 2):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit hidden_states "
                         f"{tuple(hidden_states.shape)}: expected [E, 2I, {hidden}] and [E, {hidden}, I]")
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} "
                         f"must both be [num_tokens={num_tokens}, top_k]")
    if expert_map is not None:
        check_index("expert_map", expert_map, torch.int32, 1)
    return num_tokens, hidden, num_local, two_inter // 2


def check_dynamic_int8_quant(x: Any, dtypes: Sequence[torch.dtype] = FLOATS, backend: str | None = None) -> None:
    """dynamic_int8_quant: float ``x [num_tokens, k]``."""
    check_float("x", x, dtypes, backend)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [num_tokens, k] (flatten leading dims first), got {tuple(x.shape)}")


def check_int8_scaled_mm(a: Any, b: Any, scale_a: Any, scale_b: Any, out_dtype: torch.dtype,
                         out_dtypes: Sequence[torch.dtype] = FLOATS,
                         backend: str | None = None) -> tuple[int, int, int]:
    """int8_scaled_mm: ``a [m, k]``, ``b [n, k]`` int8, ``scale_a [m, 1]``, ``scale_b [n]``, an ``out_dtype``
    of ``out_dtypes``; returns ``(m, k, n)``."""
    if (not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dtype != torch.int8
            or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2):
        got_a = f"{a.dtype} {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
        got_b = f"{b.dtype} {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"a and b must be 2-D int8 tensors, got a {got_a}, b {got_b}")
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"b must be [n, k={k}] (nn.Linear layout), got {tuple(b.shape)}")
    if _shape(scale_a) != (m, 1) or _shape(scale_b) != (n,):
        raise ValueError(f"scale_a must be [{m}, 1] and scale_b [{n}], got {_shape(scale_a)} and {_shape(scale_b)}")
    check_dtype("out_dtype", out_dtype, out_dtypes, backend)
    return m, k, n


def check_prepare_linear(weight: Any, dtypes: Sequence[torch.dtype] = FLOATS, backend: str | None = None) -> None:
    """prepare_linear: a 2-D float ``weight [n, k]``."""
    check_float("weight", weight, dtypes, backend)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [n, k] (nn.Linear layout), got {tuple(weight.shape)}")


def check_linear(x: Any, weight: Any, bias: Any, dtypes: Sequence[torch.dtype] = FLOATS,
                 backend: str | None = None) -> tuple[int, int]:
    """linear: float ``x [..., k]``, ``weight [n, k]`` and ``bias [n]`` (or None) of x's dtype; returns ``(k, n)``."""
    check_float("x", x, dtypes, backend)
    check_prepare_linear(weight, dtypes, backend)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., k] and weight [n, k] disagree on k: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype:
            raise ValueError(f"bias must be [{weight.shape[0]}] of dtype {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    return weight.shape[1], weight.shape[0]


def check_argmax(x: Any, out: Any, dtypes: Sequence[torch.dtype] = FLOATS, backend: str | None = None) -> int:
    """argmax: float ``x [rows, cols]`` (cols >= 1) and a contiguous int64 ``out [rows]`` on x's device;
    returns ``rows``."""
    check_float("x", x, dtypes, backend)
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"x must be 2-D [num_rows, num_cols] with num_cols >= 1, got {tuple(x.shape)}")
    check_index("out", out, torch.int64, 1)
    if out.shape[0] != x.shape[0]:
        raise ValueError(f"out must have one entry per row of x ({x.shape[0]}), got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device} but x on {x.device}; they must be on one device")
    return x.shape[0]


#: act_and_mul_linear's activations -> gelu_and_mul's ``approximate`` (None: silu_and_mul)
ACT_AND_MUL_ACTIVATIONS: dict[str, str | None] = {"silu": None, "gelu": "none", "gelu_tanh": "tanh"}


def check_rope_and_write_kv_cache(positions: Any, query: Any, key: Any, value: Any, cos_sin_cache: Any,
                                  head_size: int, rotary_dim: int, slot_mapping: Any, num_kv_heads: int,
                                  cache_head_size: int, dtypes: Sequence[torch.dtype] = FLOATS,
                                  backend: str | None = None) -> int:
    """rope_and_write_kv_cache (after the backend checked its cache layout): rotary_embedding's checks,
    3-D ``query [T, heads, head_size]``, ``key`` / ``value`` ``[T, num_kv_heads, head_size]`` of the query's
    dtype, and write_kv_cache's checks; returns num_tokens."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float(name, t, dtypes, backend)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [num_tokens, heads, head_size], got {tuple(t.shape)}")
        if t.dtype != query.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}; expected the query's {query.dtype}")
    num_tokens = check_rotary_embedding(positions, query, key, cos_sin_cache, head_size, rotary_dim, dtypes, backend)
    if cache_head_size != head_size:
        raise ValueError(f"head_size={head_size} does not match the cache's head size {cache_head_size}")
    check_write_kv_cache(key, value, slot_mapping, num_kv_heads, cache_head_size)
    return num_tokens


def check_act_and_mul_linear(x: Any, weight: Any, bias: Any, activation: Any, dtypes: Sequence[torch.dtype] = FLOATS,
                             backend: str | None = None) -> tuple[int, int]:
    """act_and_mul_linear: an activation of :data:`ACT_AND_MUL_ACTIVATIONS`, float ``x [..., 2 * k]`` and
    linear's checks of ``weight [n, k]`` and ``bias``; returns ``(k, n)``."""
    if activation not in ACT_AND_MUL_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACT_AND_MUL_ACTIVATIONS))}, "
                         f"got {activation!r}")
    check_gated(x, dtypes, backend)
    check_prepare_linear(weight, dtypes, backend)
    if x.shape[-1] != 2 * weight.shape[1]:
        raise ValueError(f"x [..., 2 * k] and weight [n, k] disagree: x {tuple(x.shape)} holds gate|up of "
                         f"{x.shape[-1] // 2} features, weight {tuple(weight.shape)} takes {weight.shape[1]}")
    return check_linear(x[..., : weight.shape[1]], weight, bias, dtypes, backend)


def check_paged_attention_lengths(block_table: Any, seq_lens: Any, block_size: int, max_seq_len: int) -> int:
    """paged_attention's length arguments agree: the block table covers ``max_seq_len`` and no sequence is
    longer than it. Reads ``seq_lens`` on the host (backends whose kernels run on a device skip this or do
    it where a host copy exists). Returns ``int(max_seq_len)``."""
    max_s = int(max_seq_len)
    if block_table.shape[1] * block_size < max_s:
        raise ValueError(f"block_table has {block_table.shape[1]} columns of {block_size}-token blocks, too few "
                         f"for max_seq_len={max_s}")
    if seq_lens.numel() and int(seq_lens.max()) > max_s:
        raise ValueError(f"max_seq_len={max_s} is smaller than max(seq_lens)={int(seq_lens.max())}")
    return max_s
