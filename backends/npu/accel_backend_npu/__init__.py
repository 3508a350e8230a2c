"""accel-models backend for Huawei Ascend NPUs: every op on torch_npu's fused kernels.

torch_npu is reached through :func:`get_torch_npu` only (imported lazily, so ``import accel_backend_npu``
works anywhere; tests inject ``accel_backend_npu.emulation`` with :func:`use_torch_npu`). Which kernel
runs each op, and the few cases that run the reference implementation instead, are listed in README.md.

Ops follow their inputs' device: nothing here names a device, so the CPU emulation runs the same code.
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import math
import threading
import weakref
from typing import Any

import torch

import accel_backend_reference as _reference
from accel_models import BackendInfo, KVCacheLayout, argcheck, hookimpl

from accel_backend_npu import _graphs
from accel_backend_npu._graphs import accel_capture_graph  # noqa: F401  (the capture_graph hook: ACL graphs)
from accel_backend_npu._runtime import (
    INSTALL_HINT,
    TorchNpuUnavailableError,
    get_torch_npu,
    is_emulated,
    set_torch_npu,
    use_torch_npu,
)

__all__ = ["BLOCK_SIZES", "FALLBACKS", "INSTALL_HINT", "NAME", "TorchNpuUnavailableError", "get_torch_npu",
           "is_emulated", "set_torch_npu", "use_torch_npu"]

NAME = "npu"
#: npu_fused_infer_attention_score's page attention takes blocks of 128..512 tokens, multiples of 128, when
#: a batch holds prefills; vllm-ascend runs 128. One size keeps the layout simple and is what is tested.
BLOCK_SIZES = (128,)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)
_INT_MAX = 2147483647
_MASK_SIZE = 2048  # the "optimized" causal mask of sparse_mode 2/3/4 is fixed at 2048 x 2048

logger = logging.getLogger("accel_backend_npu")

#: op -> how many calls ran the reference implementation because no fused kernel covers the case.
FALLBACKS: collections.Counter[str] = collections.Counter()
_warned: set[tuple[str, str]] = set()


def _version() -> str | None:
    try:
        return importlib.metadata.version("accel-backend-npu")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return None


@hookimpl
def accel_backend_info() -> BackendInfo:
    from accel_backend_npu._runtime import probe

    available, reason = probe()
    return BackendInfo(name=NAME, device_type="npu", available=available, reason=reason, dist_backend="hccl",
                       priority=100, version=_version())


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _fallback(op: str, why: str) -> None:
    """Record (and log once per reason) that ``op`` runs the reference implementation for this call."""
    FALLBACKS[op] += 1
    if (op, why) not in _warned:
        _warned.add((op, why))
        logger.warning("npu backend: %s runs the reference implementation (%s)", op, why)


class _CastCache:
    """One cast copy per (source tensor, dtype), dropped with the source: a cos/sin cache is cast once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, torch.dtype], tuple[weakref.ref, int, torch.Tensor]] = {}

    def get(self, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if src.dtype == dtype:
            return src
        key = (id(src), dtype)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0]() is src and hit[1] == src._version:
                return hit[2]
            out = src.to(dtype)
            self._entries[key] = (weakref.ref(src, lambda _r, k=key: self._entries.pop(k, None)), src._version, out)
            return out


_cast_cache = _CastCache()


class _HostLengths:
    """``query_start_loc[1:]`` and ``seq_lens`` as host lists, converted once per step, not once per layer.

    npu_fused_infer_attention_score takes these as ``SymInt[]`` (host ints); every layer of a step passes
    the same tensors, so the device-to-host copy happens once (keyed on identity and version counter).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[torch.Tensor, int, torch.Tensor, int, list[int], list[int]] | None = None

    def get(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> tuple[list[int], list[int]]:
        with self._lock:
            last = self._last
            if (last is not None and last[0] is query_start_loc and last[1] == query_start_loc._version
                    and last[2] is seq_lens and last[3] == seq_lens._version):
                return last[4], last[5]
            q_ends, kv_lens = query_start_loc[1:].tolist(), seq_lens.tolist()
            self._last = (query_start_loc, query_start_loc._version, seq_lens, seq_lens._version, q_ends, kv_lens)
            return q_ends, kv_lens


_host_lengths = _HostLengths()


def _step_lengths(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int) -> tuple[list[int], list[int]]:
    """The host lists npu_fused_infer_attention_score takes: from the forward context's host copies of these
    tensors when it has them (the runtime's metadata does: no device-to-host copy at all), else copied back
    once per step. Inside a graph capture a copy would synchronize, which the capture does not allow: that
    step cannot be captured (RuntimeError; the runtime runs it eagerly). Each call is noted for the capture,
    whose replays update its lengths; the capture itself runs every row at ``max_seq_len`` (a graph is
    captured with the longest context it may replay), so whatever the kernel sizes from its lengths at
    capture (its workspace, in torch_npu's graph handler) covers every replay."""
    host = _graphs.host_lengths_from_context(query_start_loc, seq_lens)
    if host is None:
        if _graphs.capturing():
            raise RuntimeError("paged_attention inside an NPU graph capture has no host copy of seq_lens and "
                               "query_start_loc (AttentionMetadata.seq_lens_host / query_start_loc_host): reading "
                               "them from the device would synchronize inside the capture")
        host = _host_lengths.get(query_start_loc, seq_lens)
    if _graphs.capturing():
        _graphs.note_attention(query_start_loc, seq_lens)
        host = (host[0], [max_seq_len] * len(host[1]))
    return host
_masks: dict[torch.device, torch.Tensor] = {}


def _causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed causal mask sparse_mode 3/4 require: triu(ones(2048, 2048), 1), True = masked."""
    mask = _masks.get(device)
    if mask is None:
        mask = torch.triu(torch.ones(_MASK_SIZE, _MASK_SIZE, dtype=torch.bool, device=device), diagonal=1)
        _masks[device] = mask
    return mask


# ----------------------------------------------------------------------------------------------------
# normalization and activations
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    argcheck.check_rms_norm(x, weight, _FLOATS, NAME)
    hidden = x.shape[-1]
    y, _rstd = get_torch_npu().npu_rms_norm(x.reshape(-1, hidden), weight.to(x.dtype), epsilon=float(eps))
    return y.view(x.shape)


@hookimpl
def accel_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    argcheck.check_fused_add_rms_norm(x, residual, weight, _FLOATS, NAME)
    hidden = x.shape[-1]
    y, _rstd, residual_out = get_torch_npu().npu_add_rms_norm(
        x.reshape(-1, hidden), residual.to(x.dtype).reshape(-1, hidden), weight.to(x.dtype), epsilon=float(eps))
    return y.view(x.shape), residual_out.view(x.shape)


@hookimpl
def accel_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    argcheck.check_gated(x, _FLOATS, NAME)
    return get_torch_npu().npu_swiglu(x, dim=-1)


@hookimpl
def accel_gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    argcheck.check_gated(x, _FLOATS, NAME)
    argcheck.check_approximate(approximate)
    last = x.shape[-1]
    rows = x.numel() // last if last else 0
    if last > 1024 or rows > 200000:  # npu_gelu_mul's documented limits
        _fallback("gelu_and_mul", "npu_gelu_mul takes a last dim <= 1024 and <= 200000 rows")
        return _reference.accel_gelu_and_mul(x=x, approximate=approximate)
    out = get_torch_npu().npu_gelu_mul(x.reshape(rows, last), approximate=approximate)
    return out.view(*x.shape[:-1], last // 2)


# ----------------------------------------------------------------------------------------------------
# rotary
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
    num_tokens = argcheck.check_rotary_embedding(positions, query, key, cos_sin_cache, head_size, rotary_dim,
                                                 _FLOATS, NAME)
    align = 16 if query.dtype == torch.float32 else 32  # npu_mrope's documented rotary_dim alignment
    why = None
    if key is None:
        why = "npu_mrope rotates query and key together; no key given"
    elif key.dtype != query.dtype:
        why = "query and key dtypes differ"
    elif rotary_dim % align:
        why = f"npu_mrope needs rotary_dim a multiple of {align} for {query.dtype}"
    if why is not None:
        _fallback("rotary_embedding", why)
        return _reference.accel_rotary_embedding(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache,
                                                 head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox)
    assert key is not None
    cache = _cast_cache.get(cos_sin_cache, query.dtype)  # the spec: cos/sin in the query's dtype
    q_out, k_out = get_torch_npu().npu_mrope(
        positions, query.reshape(num_tokens, -1), key.reshape(num_tokens, -1), cache, head_size,
        mrope_section=[0, 0, 0], rotary_mode="half" if is_neox else "interleave", cache_mode="default")
    return q_out.view(query.shape), k_out.view(key.shape)


# ----------------------------------------------------------------------------------------------------
# paged KV cache: [2, num_blocks + 1, block_size, num_kv_heads, head_size] (keys, then values). The last
# block is scratch: write_kv_cache sends negative (padding) slots there, so no host sync is needed to drop
# them, and no block_table ever points at it.
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_kv_cache_layout(num_kv_heads: int, head_size: int, dtype: torch.dtype) -> KVCacheLayout:
    if dtype not in _FLOATS:
        raise ValueError(f"KV-cache dtype {dtype} is not supported by the npu backend; supported: float16, "
                         "bfloat16 (fused attention) and float32 (attention on the reference implementation)")
    if num_kv_heads <= 0 or head_size <= 0:
        raise ValueError(f"num_kv_heads and head_size must be positive, got {num_kv_heads}, {head_size}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return KVCacheLayout(name="[2, num_blocks + 1 (scratch), block_size, num_kv_heads, head_size]",
                         block_sizes=BLOCK_SIZES, bytes_per_token=2 * num_kv_heads * head_size * itemsize)


@hookimpl
def accel_allocate_kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    argcheck.check_allocate_kv_cache(num_blocks, block_size, BLOCK_SIZES, NAME)
    accel_kv_cache_layout(num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)
    return torch.empty((2, num_blocks + 1, block_size, num_kv_heads, head_size), dtype=dtype, device=device)


def _check_cache(kv_cache: Any) -> None:
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        got = tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__
        raise ValueError(f"kv_cache has shape {got}; the npu layout is [2, num_blocks + 1, block_size, "
                         "num_kv_heads, head_size] (allocate it with allocate_kv_cache)")


@hookimpl
def accel_write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _check_cache(kv_cache)
    _, blocks_total, block_size, kv_heads, head_size = kv_cache.shape
    argcheck.check_write_kv_cache(key, value, slot_mapping, kv_heads, head_size)
    scratch = (blocks_total - 1) * block_size
    indices = torch.where(slot_mapping >= 0, slot_mapping, scratch).view(-1, 1)  # [T, 1]
    flat = kv_cache.view(2, blocks_total * block_size, kv_heads, head_size)
    tnpu = get_torch_npu()
    tnpu.npu_scatter_nd_update_(flat[0], indices, key.to(kv_cache.dtype))
    tnpu.npu_scatter_nd_update_(flat[1], indices, value.to(kv_cache.dtype))


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
    _check_cache(kv_cache)
    _, blocks_total, block_size, kv_heads, head_size = kv_cache.shape
    argcheck.check_paged_attention(query, block_table, seq_lens, query_start_loc, kv_heads, head_size)
    num_tokens, num_heads, _ = query.shape
    if num_tokens == 0:
        return query.new_zeros(query.shape)
    window = sliding_window if sliding_window and sliding_window < int(max_seq_len) else None

    why = None
    if query.dtype not in _HALF:
        why = f"npu_fused_infer_attention_score takes float16/bfloat16 queries, not {query.dtype}"
    elif kv_cache.dtype != query.dtype:
        why = f"KV cache dtype {kv_cache.dtype} differs from the query's {query.dtype}"
    elif logits_soft_cap:
        why = "npu_fused_infer_attention_score has no logits soft cap"
    elif head_size % 16:
        why = f"npu_fused_infer_attention_score needs head_size 16-aligned, got {head_size}"
    elif num_heads // kv_heads > 64:
        why = "npu_fused_infer_attention_score allows at most 64 query heads per KV head"
    elif window is not None and int(max_query_len) <= 1:
        # With every query length 1 the op takes its IncreFlashAttention branch, which (per its docs)
        # ignores sparse_mode, pre_tokens and next_tokens: the window would be silently dropped.
        why = "sliding window in a decode-only batch (the op's decode branch ignores pre_tokens)"
    if why is not None:
        _fallback("paged_attention", why)
        return _reference.accel_paged_attention(
            query=query, kv_cache=kv_cache, block_table=block_table, seq_lens=seq_lens,
            query_start_loc=query_start_loc, max_query_len=max_query_len, max_seq_len=max_seq_len, scale=scale,
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)

    q_ends, kv_lens = _step_lengths(query_start_loc, seq_lens, int(max_seq_len))
    if window is None:  # rightDownCausal: row i of a sequence sees keys j <= i + kv_len - q_len
        sparse_mode, pre_tokens, next_tokens = 3, _INT_MAX, _INT_MAX
    else:  # band, right-down origin: sees j in [p - pre_tokens, p]; the spec's window W holds p itself
        sparse_mode, pre_tokens, next_tokens = 4, window - 1, 0
    hidden = kv_heads * head_size
    out, _lse = get_torch_npu().npu_fused_infer_attention_score(
        query.contiguous(),
        kv_cache[0].view(blocks_total, block_size, hidden),
        kv_cache[1].view(blocks_total, block_size, hidden),
        atten_mask=_causal_mask(query.device),
        block_table=block_table,
        actual_seq_lengths=q_ends,
        actual_seq_lengths_kv=kv_lens,
        num_heads=num_heads,
        scale=float(scale),
        pre_tokens=pre_tokens,
        next_tokens=next_tokens,
        input_layout="TND",
        num_key_value_heads=kv_heads,
        sparse_mode=sparse_mode,
        block_size=block_size,
    )
    return out.view(num_tokens, num_heads, head_size)


# ----------------------------------------------------------------------------------------------------
# mixture of experts
# ----------------------------------------------------------------------------------------------------


def _gating_top_k_fits(num_experts: int, top_k: int, group_count: int, k_group: int) -> bool:
    """npu_moe_gating_top_k's documented limits."""
    if num_experts > 2048 or group_count <= 0 or num_experts % group_count:
        return False
    per_group = num_experts // group_count
    return (per_group > 2 and math.ceil(per_group / 32) * 32 * group_count <= 2048
            and 1 <= k_group <= group_count and 1 <= top_k <= per_group * k_group)


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
    _, num_experts, grouped = argcheck.check_moe_topk(router_logits, top_k, scoring_func, num_expert_group,
                                                      topk_group, e_score_correction_bias, _FLOATS, NAME)
    logits = router_logits.float()  # the spec scores float32(logits)
    tnpu = get_torch_npu()
    if scoring_func == "softmax" and not grouped and e_score_correction_bias is None and top_k <= 1024:
        weights, ids, _row_idx = tnpu.npu_moe_gating_top_k_softmax(logits, k=top_k)
    else:
        group_count = num_expert_group if grouped else 1
        k_group = topk_group if grouped else 1
        assert group_count is not None and k_group is not None
        if not _gating_top_k_fits(num_experts, top_k, group_count, k_group):
            _fallback("moe_topk", "outside npu_moe_gating_top_k's documented expert/group limits")
            return _reference.accel_moe_topk(
                router_logits=router_logits, top_k=top_k, scoring_func=scoring_func, renormalize=renormalize,
                num_expert_group=num_expert_group, topk_group=topk_group,
                e_score_correction_bias=e_score_correction_bias, routed_scaling_factor=routed_scaling_factor)
        bias = None if e_score_correction_bias is None else e_score_correction_bias.float()
        # The weights are gathered from the documented norm output (out_flag=True) rather than taken from
        # y_out, whose renormalization the docs leave unstated; renormalize and scaling follow the spec.
        _y, ids, norm = tnpu.npu_moe_gating_top_k(
            logits, top_k, bias=bias, k_group=k_group, group_count=group_count,
            group_select_mode=0 if bias is None else 1, renorm=0, norm_type=1 if scoring_func == "sigmoid" else 0,
            out_flag=True, routed_scaling_factor=1.0, eps=1e-20)
        weights = norm.gather(1, ids.long())
    weights = weights.float()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


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
    num_tokens, hidden, num_local, _ = argcheck.check_fused_experts(
        hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map, _FLOATS, NAME)
    if num_tokens == 0:
        return hidden_states.new_zeros((0, hidden))
    if num_local > 1024:  # npu_grouped_matmul's group_list holds at most 1024 groups
        _fallback("fused_experts", "more than 1024 local experts")
        return _reference.accel_fused_experts(hidden_states=hidden_states, w13=w13, w2=w2, topk_weights=topk_weights,
                                              topk_ids=topk_ids, activation=activation, expert_map=expert_map)
    top_k = topk_ids.shape[1]
    ids, weights = topk_ids, topk_weights
    if expert_map is not None:
        # Experts of other ranks: route to local expert 0 with weight 0 (no host sync to drop the rows).
        local = expert_map.to(torch.int32)[topk_ids.long()]
        weights = weights.masked_fill(local < 0, 0.0)
        ids = local.clamp(min=0)
    tnpu = get_torch_npu()
    # row_idx[t, j] = j * num_tokens + t: the source-row numbering npu_moe_init_routing documents.
    row_idx = torch.arange(num_tokens * top_k, dtype=torch.int32, device=hidden_states.device)
    row_idx = row_idx.view(top_k, num_tokens).t().contiguous()
    expanded_x, expanded_row_idx, expanded_expert_idx = tnpu.npu_moe_init_routing(
        hidden_states, row_idx, ids, num_tokens)
    group_list = tnpu.npu_moe_compute_expert_tokens(expanded_expert_idx, num_local).to(torch.int64)
    gate_up = tnpu.npu_grouped_matmul([expanded_x], [w13.transpose(1, 2)], group_list=group_list, split_item=2,
                                      group_type=0, group_list_type=0)[0]
    act = (accel_silu_and_mul(x=gate_up) if activation == "silu"
           else accel_gelu_and_mul(x=gate_up, approximate="none"))
    down = tnpu.npu_grouped_matmul([act], [w2.transpose(1, 2)], group_list=group_list, split_item=2,
                                   group_type=0, group_list_type=0)[0]
    return tnpu.npu_moe_finalize_routing(down, None, None, None, weights.to(down.dtype), expanded_row_idx, ids,
                                         drop_pad_mode=0, k=top_k)


# ----------------------------------------------------------------------------------------------------
# W8A8
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_dynamic_int8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    argcheck.check_dynamic_int8_quant(x, _FLOATS, NAME)
    if x.dtype not in _HALF:
        _fallback("dynamic_int8_quant", f"npu_dynamic_quant takes float16/bfloat16, not {x.dtype}")
        return _reference.accel_dynamic_int8_quant(x=x)
    x_q, scales = get_torch_npu().npu_dynamic_quant(x)
    return x_q, scales.view(-1, 1)


@hookimpl
def accel_int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    argcheck.check_int8_scaled_mm(a, b, scale_a, scale_b, out_dtype, _FLOATS, NAME)
    if out_dtype not in _HALF:
        _fallback("int8_scaled_mm", f"npu_quant_matmul's per-token mode outputs float16/bfloat16, not {out_dtype}")
        return _reference.accel_int8_scaled_mm(a=a, b=b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                                               bias=bias)
    out = get_torch_npu().npu_quant_matmul(a, b.t(), scale_b.to(torch.float32),
                                           pertoken_scale=scale_a.to(torch.float32).view(-1), output_dtype=out_dtype)
    if bias is not None:  # added outside: the docs do not say where a floating bias enters the kernel's formula
        out = (out.float() + bias.float()).to(out_dtype)
    return out
