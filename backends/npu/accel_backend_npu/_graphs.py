"""ACL graphs for decode steps: the ``capture_graph`` hook (API 1.1) on torch_npu's ``NPUGraph``.

A CUDA graph replays its kernels on new *contents* of fixed buffers. An ACL graph does too, but one kernel
this backend calls takes per-step values on the host: ``npu_fused_infer_attention_score`` gets the
cumulative query lengths and the KV lengths as ``SymInt[]`` lists, which a capture freezes. torch_npu 2.13
handles exactly that case: a graph captured with ``auto_dispatch_capture=True`` records each call of the
op (its IFA graph handler, ``torch_npu/npu/_npugraph_handlers/ifa_handler.py``) and
``NPUGraph.update(cpu_update_input=[{"actual_seq_lengths": ..., "actual_seq_lengths_kv": ...}])`` re-issues
those calls with new lengths before the next ``replay()`` (torch_npu's own test of it:
``test_ifa_update_with_non_out_and_auto_dispatch_capture``).

So a replay here is: the step's host lengths (from the forward context the runtime replays in, see
``accel_capture_graph`` in hookspecs.py; a device-to-host copy of the captured length tensors when there is
none), one ``update`` for the attention calls, ``replay``. Nothing else in the step takes host values from
the batch: the KV write maps padding slots with ``torch.where`` on the device, routing and experts have
static shapes. A step that would read the device from the host inside the capture (the reference fallbacks
check ``seq_lens`` on the host) fails the capture, and the runtime runs that batch size eagerly.

Checked on CPU only, against an emulation of the API (``emulation_graph``: captured host values stay
frozen, ``update`` rewrites the recorded lengths as torch_npu's handler does, host reads inside a capture
raise) and the wheel's Python source (``tests/backends/npu/test_npu_graphs.py``). Not run on Ascend.
"""

from __future__ import annotations

from typing import Any

import torch

from accel_models import hookimpl
from accel_models.context import current_forward_context

from accel_backend_npu._runtime import get_torch_npu, is_emulated

#: warm-up runs before capture (lazily built state, the cast and mask caches, op compilation: outside the graph)
GRAPH_WARMUP_RUNS = 1


class _Capture:
    """What the attention op tells a capture under way: the length tensors of each fused attention call,
    in call order (the order of the calls ``NPUGraph.update`` rewrites)."""

    def __init__(self) -> None:
        self.attention: list[tuple[torch.Tensor, torch.Tensor]] = []


_capture: _Capture | None = None


def capturing() -> bool:
    """True while :func:`accel_capture_graph` runs the step into a graph."""
    return _capture is not None


def note_attention(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Called by paged_attention for each npu_fused_infer_attention_score call it makes."""
    if _capture is not None:
        _capture.attention.append((query_start_loc, seq_lens))


def host_lengths_from_context(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """``(query ends, kv lengths)`` from the forward context's host copies of these very tensors, or None."""
    ctx = current_forward_context()
    md = ctx.attn_metadata if ctx is not None else None
    if (md is None or md.query_start_loc_host is None or md.seq_lens_host is None
            or md.query_start_loc is not query_start_loc or md.seq_lens is not seq_lens):
        return None
    if len(md.query_start_loc_host) != query_start_loc.numel() or len(md.seq_lens_host) != seq_lens.numel():
        raise ValueError(f"AttentionMetadata's host copies do not match its tensors: query_start_loc_host has "
                         f"{len(md.query_start_loc_host)} entries for {query_start_loc.numel()}, seq_lens_host "
                         f"{len(md.seq_lens_host)} for {seq_lens.numel()}; build them from the same values (or "
                         "leave them None)")
    return list(md.query_start_loc_host[1:]), list(md.seq_lens_host)


class NpuGraph:
    """A captured step: :meth:`replay` updates the attention calls' host lengths, then replays."""

    def __init__(self, graph: Any, outputs: Any, pool: Any, attention: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.graph = graph
        self.outputs = outputs
        self.pool = pool
        self.attention = attention

    def _update_input(self) -> list[dict[str, list[int]]]:
        per_pair: dict[tuple[int, int], dict[str, list[int]]] = {}
        calls = []
        for qsl, lens in self.attention:
            key = (id(qsl), id(lens))
            if key not in per_pair:
                host = host_lengths_from_context(qsl, lens)
                if host is None:  # replayed outside the runtime: one device-to-host copy (synchronizes)
                    host = (qsl[1:].tolist(), lens.tolist())
                per_pair[key] = {"actual_seq_lengths": host[0], "actual_seq_lengths_kv": host[1]}
            calls.append(per_pair[key])
        # every layer of a step reads the same metadata: torch_npu applies a one-entry list to every call
        return calls[:1] if len(per_pair) == 1 else calls

    def replay(self) -> Any:
        if self.attention:
            self.graph.update(cpu_update_input=self._update_input())
        self.graph.replay()
        return self.outputs


@hookimpl
def accel_capture_graph(fn: Any, device: torch.device, pool: Any) -> NpuGraph | None:
    """ACL graph of ``fn``: warm-up on a side stream, then capture with ``auto_dispatch_capture=True`` into
    ``pool`` (a fresh pool when None). None off an NPU (unless the torch_npu emulation is injected, whose
    tensors live on the CPU)."""
    global _capture
    device = torch.device(device)
    if device.type != "npu" and not is_emulated():
        return None
    npu = get_torch_npu().npu
    side = npu.Stream()
    side.wait_stream(npu.current_stream())
    with npu.stream(side):
        for _ in range(GRAPH_WARMUP_RUNS):
            fn()
    npu.current_stream().wait_stream(side)
    npu.synchronize()
    if pool is None:
        pool = npu.graph_pool_handle()
    graph = npu.NPUGraph()
    _capture = _Capture()
    try:
        with npu.graph(graph, pool=pool, auto_dispatch_capture=True):
            outputs = fn()
        attention = _capture.attention
    except Exception as exc:  # e.g. a host synchronization inside fn
        raise RuntimeError(f"ACL graph capture failed: {type(exc).__name__}: {exc}") from exc
    finally:
        _capture = None
    npu.synchronize()
    return NpuGraph(graph, outputs, pool, attention)
