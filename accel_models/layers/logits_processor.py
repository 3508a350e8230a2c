"""Hidden states -> logits through the (vocabulary-parallel) LM head."""

from __future__ import annotations

import torch
from torch import nn

from accel_models.context import get_build_context
from accel_models.layers.vocab_parallel_embedding import VocabParallelEmbedding


class LogitsProcessor(nn.Module):
    """``forward(lm_head, hidden_states [T, hidden])`` -> ``[T, vocab_size]``.

    Each rank computes its vocabulary shard; the shards are all-gathered and the padding dropped. An
    optional ``soft_cap`` (``c * tanh(x / c)``) and ``scale`` follow (Gemma-style models).
    """

    def __init__(self, vocab_size: int, *, scale: float = 1.0, soft_cap: float | None = None, prefix: str = "") -> None:
        super().__init__()
        ctx = get_build_context()
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.scale = scale
        self.soft_cap = soft_cap
        self.tp_group = ctx.tp_group
        self.tp_size = ctx.tp_group.world_size
        self._linear = ctx.ops.linear

    def forward(self, lm_head: VocabParallelEmbedding, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self._linear(x=hidden_states, weight=lm_head.weight, bias=getattr(lm_head, "bias", None),
                              prepared=getattr(lm_head, "linear_prepared", None))
        if self.tp_size > 1:
            logits = self.tp_group.all_gather(logits, dim=-1)
        logits = logits[..., : self.vocab_size]
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, scale={self.scale}, soft_cap={self.soft_cap}"
