"""Composites: the fused ops (API 1.3) written as calls of one op table's primitive ops.

A fused op (``rope_and_write_kv_cache``, ``act_and_mul_linear``) exists so a backend can do several ops'
work in one kernel launch. Where the selected backend has no native one, :func:`accel_models.resolve_ops`
binds the composite built here from the **same table's** primitives: a CUDA model's composite calls the
CUDA backend's rotary and KV write (never the reference backend's), so it stays on the device, in the
backend's cache layout and with the backend's prepared weights. A composite is the executable definition
of its hookspec ("exactly ..."); it is not a fallback (it adds no code of another backend) and strict mode
does not ask for fused ops.

Each factory takes the bound primitive functions (keyword-only, as an op table holds them) and returns a
function with every keyword of the fused op's hookspec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from accel_models.argcheck import ACT_AND_MUL_ACTIVATIONS


def rope_and_write_kv_cache(functions: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """``rotary_embedding`` then ``write_kv_cache`` of ``functions`` (the table's bound primitives)."""
    rotary_embedding = functions["rotary_embedding"]
    write_kv_cache = functions["write_kv_cache"]

    def rope_and_write_kv_cache(
        *, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        cos_sin_cache: torch.Tensor, head_size: int, rotary_dim: int, is_neox: bool, kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key is None:
            raise ValueError("rope_and_write_kv_cache needs a key ([num_tokens, num_kv_heads, head_size]); "
                             "for a query alone call rotary_embedding")
        query, key = rotary_embedding(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache,
                                      head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox)
        write_kv_cache(key=key, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)
        return query, key

    return rope_and_write_kv_cache


def act_and_mul_linear(functions: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """``silu_and_mul`` / ``gelu_and_mul`` then ``linear`` of ``functions`` (the table's bound primitives)."""
    # activation -> (bound primitive, its keywords): silu_and_mul, or gelu_and_mul with its approximate
    acts = {name: ((functions["silu_and_mul"], {}) if approximate is None
                   else (functions["gelu_and_mul"], {"approximate": approximate}))
            for name, approximate in ACT_AND_MUL_ACTIVATIONS.items()}
    linear = functions["linear"]

    def act_and_mul_linear(*, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prepared: Any,
                           activation: str) -> torch.Tensor:
        try:
            act, kwargs = acts[activation]
        except (KeyError, TypeError):
            raise ValueError(f"activation must be one of {', '.join(map(repr, ACT_AND_MUL_ACTIVATIONS))}, "
                             f"got {activation!r}") from None
        return linear(x=act(x=x, **kwargs), weight=weight, bias=bias, prepared=prepared)

    return act_and_mul_linear


def decoder_layer_decode(functions: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """Declines (None): the layer calls the table's ops one by one, which *is* the composite of a
    whole-layer op (written out in the layer's ``forward``); nothing of ``functions`` is needed."""

    def decoder_layer_decode(
        *, hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
        input_norm_weight: torch.Tensor, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
        post_norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor, eps: float,
        cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_size: int, rotary_dim: int,
        is_neox: bool, scale: float, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
        block_table: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
    ) -> None:
        return None

    return decoder_layer_decode


def moe_decoder_layer_decode(functions: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """Declines (None), as :func:`decoder_layer_decode` does: the MoE layer's ``forward`` is the composite."""

    def moe_decoder_layer_decode(
        *, hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
        input_norm_weight: torch.Tensor, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
        post_norm_weight: torch.Tensor, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        top_k: int, renormalize: bool, eps: float, cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
        head_size: int, rotary_dim: int, is_neox: bool, scale: float, kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
    ) -> None:
        return None

    return moe_decoder_layer_decode


#: fused op -> factory of its composite
FACTORIES: dict[str, Callable[[Mapping[str, Callable[..., Any]]], Callable[..., Any]]] = {
    "rope_and_write_kv_cache": rope_and_write_kv_cache,
    "act_and_mul_linear": act_and_mul_linear,
    "decoder_layer_decode": decoder_layer_decode,
    "moe_decoder_layer_decode": moe_decoder_layer_decode,
}
