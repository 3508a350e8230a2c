"""Token embedding and LM head with the vocabulary split over the TP ranks.

The vocabulary is padded to a multiple of the TP size; rank ``r`` holds rows ``[r * n, (r + 1) * n)``
(``n = padded_vocab / tp``). Padding rows are zero and never looked up; the logits processor drops them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accel_models.context import get_build_context
from accel_models.layers.utils import copy_checked, expect_shards, mark_loaded, new_param, set_weight_attrs


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    """``forward(input_ids [T])`` -> ``[T, embedding_dim]``; each rank looks up its rows, then all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, prefix: str = "") -> None:
        super().__init__()
        ctx = get_build_context()
        self.prefix = prefix
        self.tp_group = ctx.tp_group
        self.tp_rank, self.tp_size = ctx.tp_group.rank, ctx.tp_group.world_size
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = new_param(ctx, self.num_embeddings_per_partition, embedding_dim)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})
        expect_shards(self.weight)
        self._prepare_linear = ctx.ops.prepare_linear
        #: whether LogitsProcessor uses this module as the LM head (then its weight is prepared as a linear's)
        self.is_lm_head = False
        #: what the backend's prepare_linear returned for the weight (None: not prepared)
        self.linear_prepared: Any = None

    def as_lm_head(self) -> VocabParallelEmbedding:
        """Mark this embedding as the (tied) LM head too and return it: its weight gets prepared for the
        ``linear`` op after loading, like :class:`ParallelLMHead`'s."""
        self.is_lm_head = True
        return self

    def process_weights_after_loading(self) -> None:
        if self.is_lm_head:
            self.linear_prepared = self._prepare_linear(weight=self.weight)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        self.linear_prepared = None  # the weight changes: a prepared copy would be stale
        if shard_id is not None:
            raise ValueError(f"{self.prefix}: takes no shard id (got {shard_id!r})")
        expected = (self.num_embeddings, self.embedding_dim)
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(f"shape mismatch ({self.prefix}): checkpoint tensor has shape "
                             f"{tuple(loaded_weight.shape)}, expected {expected}")
        start = self.vocab_start_index
        n = max(0, min(self.vocab_end_index, self.num_embeddings) - start)
        if n:
            copy_checked(param.data[:n], loaded_weight.narrow(0, start, n), self.prefix)
        param.data[n:].zero_()
        mark_loaded(param, None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        ids = torch.where(local, input_ids - self.vocab_start_index, torch.zeros_like(input_ids))
        out = F.embedding(ids, self.weight) * local.unsqueeze(-1).to(self.weight.dtype)
        return self.tp_group.all_reduce(out)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, per_partition={self.num_embeddings_per_partition}, "
                f"embedding_dim={self.embedding_dim}, tp={self.tp_rank}/{self.tp_size}")


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, vocabulary-parallel. Used through :class:`LogitsProcessor`, never called.

    Tied embeddings: the model uses its ``embed_tokens`` module as the LM head instead of building one
    (``tie_weights`` returns it), so the two share one parameter.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, *, prefix: str = "") -> None:
        super().__init__(num_embeddings, embedding_dim, prefix=prefix)
        self.is_lm_head = True
        if bias:
            ctx = get_build_context()
            self.bias = new_param(ctx, self.num_embeddings_per_partition)
            set_weight_attrs(self.bias, {"weight_loader": self.weight_loader})
            expect_shards(self.bias)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        self.linear_prepared = None
        if param.dim() == 1:  # bias
            if tuple(loaded_weight.shape) != (self.num_embeddings,):
                raise ValueError(f"shape mismatch ({self.prefix}.bias): checkpoint tensor has shape "
                                 f"{tuple(loaded_weight.shape)}, expected ({self.num_embeddings},)")
            start = self.vocab_start_index
            n = max(0, min(self.vocab_end_index, self.num_embeddings) - start)
            param.data.zero_()
            param.data[:n].copy_(loaded_weight[start : start + n])
            mark_loaded(param, None)
            return
        super().weight_loader(param, loaded_weight, shard_id)

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> VocabParallelEmbedding:
        """Tie to ``embed_tokens``: returns it (marked as the LM head), to be used as the LM head."""
        return embed_tokens.as_lm_head()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied by LogitsProcessor, not called directly")
