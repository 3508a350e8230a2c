"""A simple way to run a loaded model through the paged-KV path, without the serving runtime.

:class:`ModelRunner` allocates one KV cache per zoo :class:`~accel_models.layers.attention.Attention` layer
(in the backend's own layout) and runs steps:

* :meth:`ModelRunner.execute` is the primitive the serving runtime builds on: it runs one batch described
  by an :class:`~accel_models.context.AttentionMetadata` and returns logits.
* :meth:`ModelRunner.step` keeps per-sequence state (blocks, tokens computed) so tests can prefill, then
  decode, in any mix: ``runner.step({0: prompt})`` then ``runner.step({0: [next_token]})``.
* :meth:`ModelRunner.forward_sequences` scores whole sequences in one mixed batch (per-position logits).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from accel_models.context import AttentionMetadata, ForwardContext, forward_context
from accel_models.layers.attention import Attention


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def build_attn_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str | None = None,
    *,
    num_padded_tokens: int | None = None,
) -> AttentionMetadata:
    """Attention metadata of a batch: sequence ``b`` has ``query_lens[b]`` new tokens at the end of its
    ``seq_lens[b]`` context, stored in blocks ``block_tables[b]``.

    ``num_padded_tokens`` (>= the real token count) pads ``slot_mapping`` with -1 (graph capture).
    """
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
    slots: list[int] = []
    for q, s, blocks in zip(query_lens, seq_lens, block_tables):
        if not 0 < q <= s:
            raise ValueError(f"each sequence needs 0 < query_len <= seq_len, got query_len={q}, seq_len={s}")
        if len(blocks) * block_size < s:
            raise ValueError(f"a sequence of {s} tokens needs {cdiv(s, block_size)} blocks of {block_size}, "
                             f"got {len(blocks)}")
        for pos in range(s - q, s):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    num_tokens = len(slots)
    if num_padded_tokens is not None:
        if num_padded_tokens < num_tokens:
            raise ValueError(f"num_padded_tokens ({num_padded_tokens}) < number of tokens ({num_tokens})")
        slots += [-1] * (num_padded_tokens - num_tokens)
    width = max(len(b) for b in block_tables)
    table = torch.zeros((len(block_tables), width), dtype=torch.int32)
    for i, blocks in enumerate(block_tables):
        table[i, : len(blocks)] = torch.tensor(list(blocks), dtype=torch.int32)
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(list(query_lens), dtype=torch.int32), 0)
    return AttentionMetadata(
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
        block_table=table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        num_actual_tokens=num_tokens,
        query_start_loc_host=qsl.tolist(),
        seq_lens_host=[int(s) for s in seq_lens],
    )


@dataclass
class _SequenceState:
    tokens: list[int] = field(default_factory=list)  # every token computed so far
    blocks: list[int] = field(default_factory=list)


class ModelRunner:
    """Runs a zoo model over a paged KV cache.

    Args:
        model: a zoo ``*ForCausalLM`` (built under a build context; its Attention layers hold the bound ops).
        num_blocks: KV-cache blocks per layer (default: enough for 4 sequences of ``max_model_len``).
        block_size: tokens per block (default: the backend layout's default).
        kv_cache_dtype: cache dtype (default: the model's parameter dtype).
        device: cache device (default: the model's parameter device).
        max_model_len: longest sequence (default: ``config.max_position_embeddings``, at most 4096).
    """

    def __init__(self, model: nn.Module, *, num_blocks: int | None = None, block_size: int | None = None,
                 kv_cache_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 max_model_len: int | None = None) -> None:
        self.model = model
        self.attn_layers: dict[str, Attention] = {
            m.prefix: m for m in model.modules() if isinstance(m, Attention)
        }
        if not self.attn_layers:
            raise ValueError(f"{type(model).__name__} has no zoo Attention layers to give KV caches to")
        delegated = [p for p, m in self.attn_layers.items() if m.impl is not None]
        if delegated:
            raise ValueError("this model was built with an attention_factory (its attention is delegated, e.g. to "
                             "vLLM): ModelRunner drives only the zoo's paged Attention")
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = kv_cache_dtype or param.dtype
        config = getattr(model, "config", None)
        self.max_model_len = max_model_len or min(getattr(config, "max_position_embeddings", 4096), 4096)
        first = next(iter(self.attn_layers.values()))
        ops = first.ops
        self.ops = ops
        layouts = {p: ops.kv_cache_layout(num_kv_heads=m.num_kv_heads, head_size=m.head_size, dtype=self.dtype)
                   for p, m in self.attn_layers.items()}
        default_sizes = next(iter(layouts.values())).block_sizes
        self.block_size = block_size or default_sizes[0]
        for p, layout in layouts.items():
            if self.block_size not in layout.block_sizes:
                raise ValueError(f"block_size {self.block_size} is not supported by backend {ops.backend!r} for layer "
                                 f"{p}; supported: {layout.block_sizes}")
        self.num_blocks = num_blocks or 4 * cdiv(self.max_model_len, self.block_size)
        self.layouts = layouts
        self.kv_caches: dict[str, torch.Tensor] = {
            p: ops.allocate_kv_cache(num_blocks=self.num_blocks, block_size=self.block_size,
                                     num_kv_heads=m.num_kv_heads, head_size=m.head_size, dtype=self.dtype,
                                     device=self.device)
            for p, m in self.attn_layers.items()
        }
        self._free_blocks = list(range(self.num_blocks - 1, -1, -1))
        self._seqs: dict[Any, _SequenceState] = {}

    # -- the primitive --------------------------------------------------------------------------------

    def execute(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                logits_indices: torch.Tensor | None = None, *, float_logits: bool = True) -> torch.Tensor:
        """Run one batch; returns the logits of the rows ``logits_indices`` (all rows if None).

        ``input_ids`` and ``positions`` are ``[T]`` int64 (packed in the metadata's sequence order). The
        logits are float32 (float64 for a float64 model, which only tests build); with ``float_logits=False``
        they stay in the model's dtype, for callers that upcast only where they need to (the runtime's
        sampler: a greedy argmax of bfloat16 logits is the argmax of their exact float32 upcast, and skipping
        the upcast saves a [rows, vocab] copy per decode step: 23 us at batch 64 on an H100).
        """
        with torch.inference_mode(), forward_context(ForwardContext(attn_metadata, self.kv_caches)):
            hidden = self.model(input_ids.to(self.device), positions.to(self.device))
            if logits_indices is not None:
                hidden = hidden[logits_indices.to(self.device)]
            logits = self.model.compute_logits(hidden)
        return logits if logits.dtype == torch.float64 or not float_logits else logits.float()

    # -- stateful convenience -------------------------------------------------------------------------

    def step(self, batch: Mapping[Any, Sequence[int]]) -> dict[Any, torch.Tensor]:
        """Append tokens to sequences (new ids start a sequence) and run them as one mixed batch.

        Returns, per sequence, the logits ``[len(new_tokens), vocab]`` of its new tokens.
        """
        if not batch:
            raise ValueError("step needs at least one sequence")
        query_lens, seq_lens, tables, ids, positions = [], [], [], [], []
        for seq_id, new in batch.items():
            new = [int(t) for t in new]
            if not new:
                raise ValueError(f"sequence {seq_id!r}: no new tokens")
            state = self._seqs.setdefault(seq_id, _SequenceState())
            start = len(state.tokens)
            total = start + len(new)
            if total > self.max_model_len:
                raise ValueError(f"sequence {seq_id!r} would have {total} tokens, more than max_model_len "
                                 f"{self.max_model_len}")
            self._grow(seq_id, state, total)
            state.tokens.extend(new)
            query_lens.append(len(new))
            seq_lens.append(total)
            tables.append(state.blocks)
            ids.extend(new)
            positions.extend(range(start, total))
        md = build_attn_metadata(query_lens, seq_lens, tables, self.block_size, self.device)
        logits = self.execute(torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), md)
        out, offset = {}, 0
        for seq_id, n in zip(batch, query_lens):
            out[seq_id] = logits[offset : offset + n]
            offset += n
        return out

    def _grow(self, seq_id: Any, state: _SequenceState, total: int) -> None:
        need = cdiv(total, self.block_size) - len(state.blocks)
        if need > len(self._free_blocks):
            raise RuntimeError(f"KV cache full: sequence {seq_id!r} needs {need} more blocks, {len(self._free_blocks)} "
                               f"free of {self.num_blocks}; free finished sequences or pass a larger num_blocks")
        for _ in range(need):
            state.blocks.append(self._free_blocks.pop())

    def free(self, seq_id: Any) -> None:
        """Forget a sequence and return its blocks."""
        state = self._seqs.pop(seq_id, None)
        if state is not None:
            self._free_blocks.extend(reversed(state.blocks))

    def reset(self) -> None:
        """Forget every sequence."""
        for seq_id in list(self._seqs):
            self.free(seq_id)

    def forward_sequences(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-position logits ``[len(seq), vocab]`` of each sequence, computed in one mixed prefill batch."""
        keys = [("forward_sequences", i) for i in range(len(sequences))]
        try:
            out = self.step(dict(zip(keys, sequences)))
        finally:
            for key in keys:
                self.free(key)
        return [out[k] for k in keys]
