"""The reference backend: every accel-models op in vectorized pure torch.

It is the ground truth of the hookspecs (each function is the executable form of its docstring in
``accel_models/hookspecs.py``), the fallback for ops a backend lacks, and fast enough to serve small
models on a CPU. It runs on any device and dtype (float64 included): it never moves data off the input's
device and never upcasts beyond the input's dtype except to accumulate in float32.

It registers itself through the ``accel_models.backends`` entry point, exactly as a third party would.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch
import torch.nn.functional as F

from accel_models import BackendInfo, KVCacheLayout, argcheck, hookimpl

NAME = "reference"
_BLOCK_SIZES = (16, 1, 2, 4, 8, 32, 64, 128, 256)


def _version() -> str | None:
    try:
        return importlib.metadata.version("accel-backend-reference")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return None


@hookimpl
def accel_backend_info() -> BackendInfo:
    # device_type "cpu" is where the reference puts new tensors by default; its ops follow their inputs.
    return BackendInfo(name=NAME, device_type="cpu", available=True, reason=None, dist_backend="gloo",
                       priority=-100, version=_version())


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# normalization and activations
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_capture_graph(fn: Any, device: torch.device, pool: Any) -> None:
    """No device graphs on the reference backend: every step runs eagerly."""
    return None


@hookimpl
def accel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    argcheck.check_rms_norm(x, weight)
    xf = x.to(_acc(x.dtype))
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps)).to(x.dtype) * weight.to(x.dtype)


@hookimpl
def accel_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    argcheck.check_fused_add_rms_norm(x, residual, weight)
    residual_out = x + residual.to(x.dtype)
    return accel_rms_norm(x=residual_out, weight=weight, eps=eps), residual_out


def _split_gate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    argcheck.check_gated(x)
    d = x.shape[-1] // 2
    acc = _acc(x.dtype)
    return x[..., :d].to(acc), x[..., d:].to(acc)


@hookimpl
def accel_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = _split_gate(x)
    return (F.silu(gate) * up).to(x.dtype)


@hookimpl
def accel_gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    argcheck.check_approximate(approximate)
    gate, up = _split_gate(x)
    return (F.gelu(gate, approximate=approximate) * up).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# rotary
# ----------------------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, is_neox: bool) -> torch.Tensor:
    # x: [T, heads, head_size]; cos, sin: [T, 1, rotary_dim // 2] in x's dtype
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


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
    num_tokens = argcheck.check_rotary_embedding(positions, query, key, cos_sin_cache, head_size, rotary_dim)
    # value check skipped under torch.compile: data-dependent branches cannot be traced (vLLM compiles the zoo)
    if num_tokens and not torch.compiler.is_compiling() and (
            int(positions.min()) < 0 or int(positions.max()) >= cos_sin_cache.shape[0]):
        raise ValueError(f"positions must lie in [0, max_position={cos_sin_cache.shape[0]}) of cos_sin_cache, "
                         f"got values in [{int(positions.min())}, {int(positions.max())}]")
    cos_sin = cos_sin_cache.index_select(0, positions).to(query.dtype)
    cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)

    def apply(t: torch.Tensor) -> torch.Tensor:  # [T, heads * head_size] or [T, heads, head_size]
        heads = t.shape[1] if t.dim() == 3 else t.shape[1] // head_size
        return _rotate(t.reshape(num_tokens, heads, head_size), cos, sin, rotary_dim, is_neox).reshape(t.shape)

    return apply(query), (apply(key) if key is not None else None)


# ----------------------------------------------------------------------------------------------------
# paged KV cache: layout [2, num_blocks, block_size, num_kv_heads, head_size] (keys, then values)
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_kv_cache_layout(num_kv_heads: int, head_size: int, dtype: torch.dtype) -> KVCacheLayout:
    argcheck.check_dtype("KV-cache dtype", dtype)
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
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache has shape {tuple(kv_cache.shape)}; the reference layout is "
            "[2, num_blocks, block_size, num_kv_heads, head_size] (allocate it with allocate_kv_cache)"
        )


@hookimpl
def accel_write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _check_cache(kv_cache)
    _, num_blocks, block_size, kv_heads, head_size = kv_cache.shape
    argcheck.check_write_kv_cache(key, value, slot_mapping, kv_heads, head_size)
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_size)
    if slot_mapping.numel() and int(slot_mapping.min()) >= 0:  # no padding: skip the boolean selection
        slots = slot_mapping
    else:
        valid = slot_mapping >= 0
        slots, key, value = slot_mapping[valid], key[valid], value[valid]
    flat[0].index_copy_(0, slots, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, value.to(kv_cache.dtype))


def _decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, max_s: int, scale: float, sliding_window: int | None,
                      logits_soft_cap: float | None) -> torch.Tensor:
    """``accel_paged_attention`` for one query row per sequence (each at position ``seq_len - 1``), so the
    causal mask reduces to ``k < seq_len`` (and ``k >= seq_len - W`` in a sliding window)."""
    _, num_blocks, block_size, kv_heads, head_size = kv_cache.shape
    batch, num_heads, _ = query.shape
    group = num_heads // kv_heads
    n_blocks = (max_s + block_size - 1) // block_size
    # Entries past a sequence's last block may hold anything: clamp them to a valid block (masked below).
    blocks = block_table[:, :n_blocks].long().clamp_(0, num_blocks - 1)
    kv = kv_cache[:, blocks].view(2, batch, n_blocks * block_size, kv_heads, head_size)[:, :, :max_s]
    kv = kv.permute(0, 1, 3, 2, 4).to(query.dtype).contiguous()  # [2, B, kv_heads, max_s, D]
    k_pos = torch.arange(max_s, device=query.device)
    hidden = k_pos[None, :] >= seq_lens[:, None]  # [B, max_s]
    if sliding_window:
        hidden |= k_pos[None, :] < seq_lens[:, None] - sliding_window
    # Slots outside the context were never written and may hold NaN/inf (0-probability * NaN is NaN).
    kv.masked_fill_(hidden[None, :, None, :, None], 0)
    k = kv[0].view(batch * kv_heads, max_s, head_size)
    v = kv[1].view(batch * kv_heads, max_s, head_size)
    q = query.reshape(batch * kv_heads, group, head_size)
    scores = torch.bmm(q, k.transpose(1, 2)).to(_acc(query.dtype)) * scale  # [B * kvh, group, max_s]
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    scores = scores.view(batch, kv_heads, group, max_s).masked_fill_(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype).view(batch * kv_heads, group, max_s)
    out = torch.bmm(probs, v)  # [B * kvh, group, D]
    return out.reshape(batch, num_heads, head_size)


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
    _check_cache(kv_cache)
    _, _, block_size, kv_heads, head_size = kv_cache.shape
    batch = argcheck.check_paged_attention(query, block_table, seq_lens, query_start_loc, kv_heads, head_size)
    num_tokens, num_heads, _ = query.shape
    group = num_heads // kv_heads
    dev = query.device
    max_q = int(max_query_len)
    max_s = argcheck.check_paged_attention_lengths(block_table, seq_lens, block_size, max_seq_len)

    if max_q == 1 and num_tokens == batch:  # a pure decode batch: the same math in a third of the ops
        return _decode_attention(query, kv_cache, block_table, seq_lens, max_s, scale, sliding_window,
                                 logits_soft_cap)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [B]
    # A pure decode batch (one query row per sequence) is already [B, 1, heads, D]; otherwise pad the packed
    # queries to [B, max_q]: token t is row i of sequence b.
    decode = max_q == 1 and num_tokens == batch
    if decode:
        q = query.view(batch, 1, num_heads, head_size)
    else:
        tok_seq = torch.repeat_interleave(torch.arange(batch, device=dev), q_lens.long(), output_size=num_tokens)
        tok_row = torch.arange(num_tokens, device=dev) - query_start_loc[:-1].long()[tok_seq]
        q = query.new_zeros((batch, max_q, num_heads, head_size))
        q[tok_seq, tok_row] = query

    # Gather each sequence's context (keys and values in one index): [2, B, kv_heads, max_s, D]. Block-table
    # entries past a sequence's last block may hold anything (they are ignored): read block 0 in their
    # place. Slots past seq_len were never written and may hold NaN/inf: zero them (0 * NaN is NaN).
    n_blocks = (max_s + block_size - 1) // block_size
    seq_blocks = (seq_lens.long() + block_size - 1) // block_size  # [B]
    blocks = block_table[:, :n_blocks].long()
    blocks = blocks.masked_fill(torch.arange(n_blocks, device=dev)[None, :] >= seq_blocks[:, None], 0)
    k_pos = torch.arange(max_s, device=dev)
    kv = kv_cache[:, blocks].flatten(2, 3)[:, :, :max_s]  # [2, B, max_s, kv_heads, D] (a new tensor)
    kv = kv.masked_fill_((k_pos[None, :] >= seq_lens.long()[:, None])[None, :, :, None, None], 0)
    kv = kv.to(query.dtype).permute(0, 1, 3, 2, 4).contiguous()  # [2, B, kv_heads, max_s, D]
    k, v = kv[0], kv[1]

    # GQA without expanding the cache: the group's query heads become extra rows of their KV head.
    qh = q.view(batch, max_q, kv_heads, group, head_size).permute(0, 2, 3, 1, 4).reshape(
        batch, kv_heads, group * max_q, head_size)
    scores = torch.matmul(qh, k.transpose(-1, -2)).to(_acc(query.dtype)) * scale  # [B, kvh, group*max_q, max_s]
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)

    # Query row i of sequence b sits at position seq_len - q_len + i; it sees keys k <= p (and > p - W).
    q_pos = (seq_lens - q_lens).long()[:, None] + torch.arange(max_q, device=dev)[None, :]  # [B, max_q]
    visible = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, max_q, max_s]
    if sliding_window:
        visible &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores = scores.view(batch, kv_heads, group, max_q, max_s).masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype).view(batch, kv_heads, group * max_q, max_s)
    out = torch.matmul(probs, v)  # [B, kv_heads, group * max_q, D]
    out = out.view(batch, kv_heads, group, max_q, head_size).permute(0, 3, 1, 2, 4).reshape(
        batch, max_q, num_heads, head_size)
    return out.view(num_tokens, num_heads, head_size) if decode else out[tok_seq, tok_row]


# ----------------------------------------------------------------------------------------------------
# mixture of experts
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_argmax(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """torch's argmax, computed as the runtime's ``argmax_rows`` (the same indices; per-chunk maxima first,
    which parallelizes a vocabulary-long row far better on a device than one long reduction)."""
    from accel_models.runtime.sampler import argmax_rows

    argcheck.check_argmax(x, out)
    return out.copy_(argmax_rows(x))


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
    num_tokens, num_experts, grouped = argcheck.check_moe_topk(
        router_logits, top_k, scoring_func, num_expert_group, topk_group, e_score_correction_bias)
    acc = _acc(router_logits.dtype)
    if scoring_func == "softmax":
        scores = torch.softmax(router_logits.to(acc), dim=-1)
    else:  # "sigmoid" (checked above)
        scores = torch.sigmoid(router_logits.to(acc))
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.to(acc)
    if grouped:
        assert num_expert_group is not None
        grouped_choice = choice.view(num_tokens, num_expert_group, -1)
        if e_score_correction_bias is None:
            group_scores = grouped_choice.amax(dim=-1)
        else:
            group_scores = grouped_choice.topk(min(2, grouped_choice.shape[-1]), dim=-1).values.sum(dim=-1)
        top_groups = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        choice = choice.masked_fill(~keep.repeat_interleave(num_experts // num_expert_group, dim=1), float("-inf"))
    # a stable descending sort breaks ties toward the lower expert id
    topk_ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    topk_weights = topk_weights * routed_scaling_factor
    out_dtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    return topk_weights.to(out_dtype), topk_ids.to(torch.int32)


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
        hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map)
    top_k = topk_ids.shape[1]
    acc = _acc(hidden_states.dtype)
    ids = topk_ids.long().flatten()
    if expert_map is not None:
        ids = expert_map.long()[ids]  # -1: held by another rank
    # Sort the (token, choice) pairs by local expert and walk the runs of each expert present.
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids.clamp(min=-1) + 1, minlength=num_local + 1)[1:].tolist()
    if len(counts) > num_local:
        raise ValueError(f"topk_ids (through expert_map, if given) name local expert {len(counts) - 1}, but w13 holds "
                         f"only {num_local} experts: pass expert_map for expert parallelism")
    start = int((ids < 0).sum())
    token_of = order // top_k
    weight_of = topk_weights.flatten().to(acc)[order]
    out = torch.zeros((num_tokens, hidden), dtype=acc, device=hidden_states.device)
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token_of[start : start + n]
        h = hidden_states[tok] @ w13[e].t()
        act = accel_silu_and_mul(x=h) if activation == "silu" else accel_gelu_and_mul(x=h, approximate="none")
        y = act @ w2[e].t()
        out.index_add_(0, tok, y.to(acc) * weight_of[start : start + n, None])
        start += n
    return out.to(hidden_states.dtype)


# ----------------------------------------------------------------------------------------------------
# Dense linear
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_prepare_linear(weight: torch.Tensor) -> None:
    argcheck.check_prepare_linear(weight)
    return None  # torch's matmul reads the nn.Linear layout as it is


@hookimpl
def accel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prepared: Any) -> torch.Tensor:
    argcheck.check_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------------
# W8A8
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_dynamic_int8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    argcheck.check_dynamic_int8_quant(x)
    xf = x.to(torch.float32) if x.dtype != torch.float64 else x
    amax = xf.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    x_q = torch.round(xf * inv).clamp(-127, 127).to(torch.int8)
    return x_q, (amax / 127.0).to(torch.float32)


@hookimpl
def accel_int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    argcheck.check_int8_scaled_mm(a, b, scale_a, scale_b, out_dtype)
    if a.device.type == "cpu":
        acc = (a.to(torch.int32) @ b.to(torch.int32).t()).to(torch.float32)  # exact in int32
    else:  # devices without integer matmul: float64 is exact for |sum| < 2**53
        acc = (a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.float32)
    out = acc * scale_a.to(torch.float32) * scale_b.to(torch.float32)[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)
