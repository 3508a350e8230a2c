"""Attention over the paged KV cache, named by its prefix.

Per-step state comes from the forward context: ``ctx.kv_caches[self.prefix]`` (this layer's cache, in the
backend's own layout) and ``ctx.attn_metadata`` (the batch). When the build context carries an
``attention_factory`` (the vLLM adapter), the layer delegates to the module that factory builds instead.

A layer built with ``rotary_emb`` also applies the rotary embedding (``forward(q, k, v, positions)``): on
the paged path in the same op call as the KV write (``rope_and_write_kv_cache``, API 1.3: one kernel on
backends that fuse it, the composite ``rotary_embedding`` + ``write_kv_cache`` elsewhere); where the cache
is not ours (the vLLM adapter's attention), with the rotary op first and the delegate after, as before.
"""

from __future__ import annotations

import torch
from torch import nn

from accel_models.context import get_build_context, get_forward_context
from accel_models.layers.rotary_embedding import RotaryEmbedding


class Attention(nn.Module):
    """``forward(q [T, H * D], k [T, Hk * D], v [T, Hk * D], positions=None)`` -> ``[T, H * D]``.

    Writes this step's keys and values into the layer's cache (``write_kv_cache``), then attends over
    the cache (``paged_attention``): causal, GQA, optional sliding window and logit soft cap.
    ``num_heads`` / ``num_kv_heads`` are this rank's heads (after tensor-parallel sharding).

    ``rotary_emb``: a :class:`~accel_models.layers.rotary_embedding.RotaryEmbedding` of this layer's head
    size, or None. With it, q and k arrive *unrotated* and ``forward`` needs ``positions`` ([T] int64): the
    layer rotates them, fused with the KV write (``rope_and_write_kv_cache``) on the paged path. Without
    it, q and k arrive rotated (the caller applied its rotary) and ``positions`` is ignored. The module is
    shared with its owner (e.g. ``LlamaAttention.rotary_emb``), which registers it first.
    """

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 prefix: str = "", sliding_window: int | None = None, logits_soft_cap: float | None = None,
                 rotary_emb: RotaryEmbedding | None = None) -> None:
        super().__init__()
        if not prefix:
            raise ValueError("Attention needs its prefix (its path in the model, e.g. 'model.layers.0.self_attn.attn'): "
                             "the prefix names its KV cache")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"{prefix}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        ctx = get_build_context()
        self.prefix = prefix
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.sliding_window = sliding_window or None
        self.logits_soft_cap = logits_soft_cap or None
        self.impl: nn.Module | None = None
        self.ops = ctx.ops  # the bound op table (the runner allocates caches with the same backend)
        if rotary_emb is not None and rotary_emb.head_size != head_size:
            raise ValueError(f"{prefix}: rotary_emb has head_size {rotary_emb.head_size}, the layer {head_size}")
        self.rotary_emb = rotary_emb
        if ctx.attention_factory is not None:
            self.impl = ctx.attention_factory(
                num_heads=num_heads, head_size=head_size, scale=self.scale, num_kv_heads=num_kv_heads,
                prefix=prefix, sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap,
            )
            return
        self._write_kv_cache = ctx.ops.write_kv_cache
        self._rope_and_write_kv_cache = ctx.ops.rope_and_write_kv_cache
        self._paged_attention = ctx.ops.paged_attention

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        rope = self.rotary_emb
        if rope is not None and positions is None:
            raise ValueError(f"{self.prefix}: this Attention applies its rotary_emb and needs positions: "
                             "call attn(q, k, v, positions)")
        if self.impl is not None:
            if rope is not None:  # the delegate owns the cache: rotary first, as a separate op
                q, k = rope(positions, q, k)
            return self.impl(q, k, v)
        ctx = get_forward_context()
        md = ctx.attn_metadata
        try:
            kv_cache = ctx.kv_caches[self.prefix]
        except KeyError:
            raise RuntimeError(f"the forward context has no KV cache for attention layer {self.prefix!r} "
                               f"(it has {sorted(ctx.kv_caches)[:4]}...); allocate one per Attention prefix") from None
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_size)
        k = k.view(num_tokens, self.num_kv_heads, self.head_size)
        v = v.view(num_tokens, self.num_kv_heads, self.head_size)
        slots = md.slot_mapping[:num_tokens]
        if rope is not None:
            q, k = self._rope_and_write_kv_cache(
                positions=positions, query=q, key=k, value=v, cos_sin_cache=rope.cos_sin_cache,
                head_size=rope.head_size, rotary_dim=rope.rotary_dim, is_neox=rope.is_neox, kv_cache=kv_cache,
                slot_mapping=slots)
        else:
            self._write_kv_cache(key=k, value=v, kv_cache=kv_cache, slot_mapping=slots)
        n = md.num_actual_tokens
        out = self._paged_attention(
            query=q[:n] if n < num_tokens else q, kv_cache=kv_cache, block_table=md.block_table,
            seq_lens=md.seq_lens, query_start_loc=md.query_start_loc, max_query_len=md.max_query_len,
            max_seq_len=md.max_seq_len, scale=self.scale, sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
        )
        if n < num_tokens:  # padded batch (e.g. a captured graph): padding rows are zero
            out = torch.cat((out, out.new_zeros((num_tokens - n, *out.shape[1:]))))
        return out.reshape(num_tokens, self.num_heads * self.head_size)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_size={self.head_size}, "
                f"scale={self.scale:.4g}, sliding_window={self.sliding_window}, soft_cap={self.logits_soft_cap}")
