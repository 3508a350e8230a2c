"""The standalone runtime: paged KV cache, continuous batching, sampling and the ``LLM`` API.

Pieces (each its own module):

* ``kv_cache``: a block allocator and the per-request block tables. The cache tensors are the backend's
  (``allocate_kv_cache``, through :class:`accel_models.runner.ModelRunner`); ``LLM`` sizes them from
  ``kv_cache_memory`` (default 256 MiB, fixed, not a fraction of RAM) and the layout's ``bytes_per_token``,
  and caps ``max_model_len`` to what they hold (an explicit larger ``max_model_len`` is an error that says
  how much memory it needs).
* ``metadata``: step inputs (ids, positions, slot mapping, query start locations, sequence lengths, block
  table, logits indices) in persistent buffers sized by ``max_num_seqs`` / ``max_num_batched_tokens`` /
  blocks per sequence, so decode steps can be captured as device graphs (``graphs``).
* ``scheduler``: continuous batching under a token budget: running requests first (decodes and prefill
  chunks), then waiting ones; chunked prefill; preemption by recompute when blocks run out.
* ``sampler``: vLLM's V1 order (min_tokens, penalties, greedy, temperature, min-p, top-k, top-p, exponential
  race), per-request seeds independent of the batch, logprobs from the raw logits.
* ``tokenizer``: tokenizer.json via ``tokenizers``; BOS per tokenizer_config; chat templates (jinja2, when
  installed); incremental detokenization.
* ``llm``: :class:`LLM` (``generate``, ``chat``, ``score``, and the step API ``add_request`` / ``step`` /
  ``abort`` / ``has_unfinished_requests`` for servers; see ``examples/server``).

Bad input: the step API raises ``ValueError`` at ``add_request`` (nothing queued); ``generate`` returns a
finished output with ``finish_reason == "error"`` and ``error`` set for each bad prompt, the others run.
``SamplingParams`` rejects out-of-range values when it is built. ``LLM`` is not thread-safe: drive it from
one thread (the example server's engine thread).

``LLM`` loads lazily (``from accel_models.runtime import LLM``) so importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LLM": "accel_models.runtime.llm",
    "SamplingParams": "accel_models.runtime.sampling_params",
    "RequestOutput": "accel_models.runtime.outputs",
    "CompletionOutput": "accel_models.runtime.outputs",
    "Logprob": "accel_models.runtime.outputs",
    "Tokenizer": "accel_models.runtime.tokenizer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'accel_models.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
