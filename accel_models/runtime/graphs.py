"""Device graphs for decode steps: capture once per batch size, replay with new inputs.

The backend's ``capture_graph`` hook (API 1.1) does the capturing (CUDA graphs on the CUDA backend, ACL
graphs on an NPU backend later); this module only decides *what* to capture and *when* to replay, so
nothing device-specific lives in the runtime.

A pure decode step of ``n`` sequences runs as the captured graph of the smallest batch size ``P >= n``:
the padding sequences ``n .. P-1`` get token 0 at position 0, slot -1 (their key/value is not written),
one token of query and a context of one token (read from whatever block their stale block-table row names:
their outputs are garbage that nobody reads, and rows never mix). Their logits rows are dropped. The graph
reads the runtime's persistent input buffers (:class:`~accel_models.runtime.metadata.InputBuffers`), so a
replay needs only the usual host-to-device copy of the step's inputs.

Each size is captured twice: the step returning its logits (for sampling on the host or with a
temperature), and a *greedy* step that also takes the argmax of every row inside the graph and writes the
ids (the backend's ``argmax`` op, API 1.6) into the input-ids buffer, where the next decode step of the
same sequences reads them. A greedy step (every row at temperature 0, no logprobs, penalties or active
min_tokens) then costs one graph launch on the device: no argmax kernels launched after the graph and no
copy of the sampled ids into the next step's inputs (on an H200 that took 19-55 us off every step in
two runs, docs/BENCHMARKS.md "Session 13"). The greedy graph keeps no logits (they are an intermediate of its
capture), so it adds only its ids to the graphs' memory.

Prefill, chunked and mixed steps, steps wanting prompt logprobs, and batches larger than the largest
captured size run eagerly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from accel_models.context import ForwardContext, forward_context

logger = logging.getLogger("accel_models.runtime")

#: Decode batch sizes captured by default (those above ``max_num_seqs`` are dropped).
DEFAULT_GRAPH_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def check_batch_sizes(sizes: Sequence[int] | None, max_num_seqs: int) -> tuple[int, ...]:
    """The sorted batch sizes to capture (at most ``max_num_seqs``); ValueError for bad entries."""
    if sizes is None:
        sizes = [s for s in DEFAULT_GRAPH_BATCH_SIZES if s < max_num_seqs] + [max_num_seqs]
    out = set()
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"graph_batch_sizes must be positive ints, got {s!r}")
        if s > max_num_seqs:
            raise ValueError(f"graph batch size {s} exceeds max_num_seqs ({max_num_seqs}); drop it or raise "
                             "max_num_seqs")
        out.add(s)
    return tuple(sorted(out))


class DecodeGraphs:
    """The captured decode graphs of one model runner, keyed by padded batch size.

    Args:
        runner: a :class:`~accel_models.runner.ModelRunner` (its ``execute`` is what gets captured).
        buffers: the runtime's :class:`~accel_models.runtime.metadata.InputBuffers`.
        capture_graph: the bound ``capture_graph`` op of the runner's backend.
        batch_sizes: sizes to capture (see :func:`check_batch_sizes`).
        max_model_len: the longest context a replay may see (the attention plan is made for it).
    """

    def __init__(self, runner: Any, buffers: Any, capture_graph: Any, batch_sizes: Sequence[int],
                 max_model_len: int) -> None:
        self.runner = runner
        self.buffers = buffers
        self.capture_graph = capture_graph
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_model_len = max_model_len
        self.graphs: dict[int, Any] = {}
        #: per size, the inputs it was captured with (replays run in a forward context of their metadata)
        self._captured: dict[int, Any] = {}
        #: per size, the greedy variant (argmax in the graph, ids written to the input-ids buffer); a size
        #: whose greedy capture failed has none and samples after its plain graph
        self.greedy_graphs: dict[int, Any] = {}
        #: use the greedy graphs where a step allows it (benchmarks turn it off to measure the difference)
        self.sample_in_graph = True
        self.replays = 0  # steps served by a graph (tests and benchmarks read these)
        self.greedy_replays = 0  # of which by a greedy graph
        self.eager_decode_steps = 0
        self.unsupported: str | None = None  # why the backend captured nothing
        self.capture_failed = False  # it offered graphs, but a capture raised

    # -- capture ---------------------------------------------------------------------------------------

    def capture(self) -> None:
        """Capture every batch size, largest first, in one memory pool. Stops (no graphs, eager steps) at
        the first size the backend declines or fails to capture, saying why in the log."""
        pool = None
        for size in sorted(self.batch_sizes, reverse=True):
            self._write_padding(0, size)
            inputs = self._prepare(size)

            def step(inputs: Any = inputs) -> torch.Tensor:
                return self.runner.execute(inputs.input_ids, inputs.positions, inputs.attn_metadata, None,
                                           float_logits=False)

            try:
                graph = self.capture_graph(fn=step, device=self.buffers.device, pool=pool)
            except RuntimeError as exc:
                self.unsupported = f"capture of decode batch {size} failed: {exc}"
                self.capture_failed = True
                logger.warning("device graphs disabled (eager steps): %s", self.unsupported)
                self.graphs.clear()
                self.greedy_graphs.clear()
                return
            if graph is None:
                self.unsupported = "the backend does not capture device graphs"
                self.graphs.clear()
                self.greedy_graphs.clear()
                return
            pool = getattr(graph, "pool", None)
            self.graphs[size] = graph
            self._captured[size] = inputs
            self._capture_greedy(size, inputs, pool)
        logger.info("captured decode graphs for batch sizes %s (greedy variants: %s)", sorted(self.graphs),
                    sorted(self.greedy_graphs))

    def _capture_greedy(self, size: int, inputs: Any, pool: Any) -> None:
        """The greedy variant of size ``size`` (see the module docstring); on failure the size keeps only
        its plain graph (greedy steps then sample after it), with a warning saying why."""
        ids = self.buffers.dev["input_ids"][:size]
        argmax = self.runner.ops.argmax  # the backend's (one launch on CUDA), else the reference's reductions

        def greedy_step(inputs: Any = inputs) -> torch.Tensor:
            logits = self.runner.execute(inputs.input_ids, inputs.positions, inputs.attn_metadata, None,
                                         float_logits=False)
            # written where the next step's graph reads its input ids (the same sequences in the same rows)
            return argmax(x=logits, out=ids)

        try:
            graph = self.capture_graph(fn=greedy_step, device=self.buffers.device, pool=pool)
        except (RuntimeError, ValueError) as exc:  # a failed capture, or an argmax declining these logits
            logger.warning("greedy decode graph of batch %d not captured (greedy steps sample after the "
                           "graph): %s", size, exc)
            return
        if graph is not None:
            self.greedy_graphs[size] = graph

    # -- replay ----------------------------------------------------------------------------------------

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured batch size a decode of ``num_seqs`` sequences runs as (None: run eagerly)."""
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size if size in self.graphs else None
        return None

    def _write_padding(self, start: int, end: int) -> None:
        """Host-side inputs of padding sequences ``start .. end-1`` (one token each)."""
        h = self.buffers.host
        h["input_ids"][start:end] = 0
        h["positions"][start:end] = 0
        h["slot_mapping"][start:end] = -1
        h["seq_lens"][start:end] = 1
        h["query_start_loc"][start + 1 : end + 1] = np.arange(start + 1, end + 1, dtype=np.int32)
        h["logits_indices"][start:end] = np.arange(start, end)
        if start == 0:
            h["query_start_loc"][0] = 0
            h["block_table"][:end] = 0

    def _prepare(self, size: int) -> Any:
        """Publish ``size`` one-token sequences with the widest block table and the longest context: the
        views (and the attention plan) a graph is captured with and every replay of it matches."""
        return self.buffers.prepare(size, size, size, 1, self.max_model_len, self.buffers.max_blocks_per_seq)

    def pad(self, num_seqs: int, size: int) -> None:
        """Before the step's metadata is built: padding for sequences ``num_seqs .. size-1``."""
        if size > num_seqs:
            self._write_padding(num_seqs, size)

    def replay(self, num_seqs: int, size: int) -> torch.Tensor:
        """Run the graph of ``size`` on the inputs the metadata builder just published (the real sequences
        first, then the padding from :meth:`pad`: the builder's host-to-device copy moves whole buffers
        into the captured addresses); returns the ``num_seqs`` real logits rows."""
        logits = self._replay(self.graphs[size], size)
        self.replays += 1
        return logits[:num_seqs]

    def _replay(self, graph: Any, size: int) -> Any:
        """``graph.replay()`` inside a forward context whose attention metadata is the one ``size`` was captured
        with (the same tensors) carrying this step's host lengths, padding included: a backend whose captured
        kernels take host-side lengths (ACL graphs: torch_npu's attention) updates them from there before it
        replays. The lengths are read from the host buffers the metadata builder just published."""
        h = self.buffers.host
        md = dataclasses.replace(self._captured[size].attn_metadata,
                                 query_start_loc_host=h["query_start_loc"][: size + 1].tolist(),
                                 seq_lens_host=h["seq_lens"][:size].tolist())
        with forward_context(ForwardContext(md, self.runner.kv_caches)):
            return graph.replay()

    def has_greedy(self, size: int) -> bool:
        """Whether a greedy step of padded size ``size`` can run as :meth:`replay_greedy`."""
        return self.sample_in_graph and size in self.greedy_graphs

    def replay_greedy(self, num_seqs: int, size: int) -> torch.Tensor:
        """Run the greedy graph of ``size`` (inputs published as for :meth:`replay`); returns the ``num_seqs``
        real rows' argmax ids (int64, on the device), which are also in the input-ids buffer's first rows."""
        tokens = self._replay(self.greedy_graphs[size], size)
        self.replays += 1
        self.greedy_replays += 1
        return tokens[:num_seqs]
