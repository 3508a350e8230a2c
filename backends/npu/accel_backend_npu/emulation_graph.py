"""EMULATION of torch_npu's ACL graph API (``torch_npu.npu.NPUGraph`` and friends) on CPU, for tests only.

This is NOT an ACL graph and says nothing about Ascend's graph runtime. It emulates, from the torch-npu
2.13.0 wheel's ``torch_npu/npu/graphs.py`` and ``torch_npu/npu/_npugraph_handlers/``, the part of the API
the NPU backend uses (``Stream``, ``current_stream``, ``stream``, ``synchronize``, ``graph_pool_handle``,
``NPUGraph`` with ``replay``/``update``/``pool``, and the ``graph`` context manager), with the one property
that makes graphs hard to get right: **what was captured is replayed as it was captured**.

* Inside ``with graph(g, ...)`` every aten op that runs is recorded (a ``TorchDispatchMode``), and every
  emulated torch_npu kernel is recorded as one entry (its own internals are not). A replay runs the
  recorded entries again in order, on the same tensors (their *current* contents), writing each result into
  the tensor the capture produced, so later entries read it at the captured address. Every host-side value
  (an int, a list of lengths, a Python branch taken) stays what it was at capture, as on the device.
* A host synchronization inside a capture (``.item()``, ``int(t)``, ``torch.equal``, ``nonzero``, ...:
  the aten ops that hand device data to the host, and ``Tensor.tolist``, which reads without dispatching)
  raises :class:`GraphCaptureError`, as a capture on the device fails on a synchronous copy.
* ``update(cpu_update_input)`` does what torch_npu's auto-dispatch capture documents: for each recorded
  ``npu_fused_infer_attention_score`` (the op its IFA handler registers), in capture order, the keyword
  arguments ``actual_seq_lengths`` / ``actual_seq_lengths_kv`` present in the call are replaced; a
  one-entry list applies to every recorded call, any other length must match the number of calls; a graph
  captured without ``auto_dispatch_capture=True`` refuses the update.

Not emulated (so not checked here): memory pools (``graph_pool_handle`` returns a token), streams and
events (the CPU has one order), host-to-device copies inside a capture (they replay with their captured
values here; on the device they are a capture error or a stale copy), capture error modes.

Every call the backend makes into this API is recorded in :data:`GRAPH_API_LOG` as ``(name, positional
count, keyword names)`` so ``tests/backends/npu`` can check it against the wheel's Python source.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

IS_EMULATION = True
__all__ = ["GRAPH_API_LOG", "GraphCaptureError", "NpuNamespaceEmulation", "active_capture"]

#: (API name, number of positional arguments, sorted keyword names) of every call into the emulated API
GRAPH_API_LOG: dict[tuple[str, int, tuple[str, ...]], None] = {}
_log_lock = threading.Lock()

#: torch_npu's IFA graph handler (``_npugraph_handlers/ifa_handler.py``): op -> the arguments ``update`` sets
UPDATABLE: dict[str, tuple[str, ...]] = {
    "npu_fused_infer_attention_score": ("actual_seq_lengths", "actual_seq_lengths_kv"),
}

#: aten ops that copy device data to the host (a synchronization: not allowed inside a capture)
_HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique_dim",
               "_unique2", "unique_consecutive", "item"}

#: aten allocations without contents
_UNINITIALIZED = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}


class GraphCaptureError(RuntimeError):
    """The captured work did something a device graph capture does not allow (a host synchronization)."""


def _log(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with _log_lock:
        GRAPH_API_LOG.setdefault((name, len(args), tuple(sorted(kwargs))), None)


# ----------------------------------------------------------------------------------------------------
# what a capture records
# ----------------------------------------------------------------------------------------------------


def _copy_into(captured: Any, fresh: Any) -> None:
    """Write a replayed result into the tensors the capture produced (skipping those that are the same
    memory: in-place and ``out=`` ops, views)."""
    olds, _ = tree_flatten(captured)
    news, _ = tree_flatten(fresh)
    for o, n in zip(olds, news):
        if isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor) and o is not n:
            if o.data_ptr() == n.data_ptr() and o.stride() == n.stride() and o.shape == n.shape:
                continue
            o.copy_(n)


def _frozen(value: Any) -> Any:
    """A host value as the capture saw it (tensors by reference: their contents are read at replay)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return copy.deepcopy(value)


@dataclass
class _AtenEntry:
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any

    def run(self) -> None:
        _copy_into(self.out, self.func(*self.args, **self.kwargs))


@dataclass
class _KernelEntry:
    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any
    updatable: bool = False

    def run(self) -> None:
        _copy_into(self.out, self.fn(*self.args, **self.kwargs))


def _aliases_an_input(out: Any, args: Any, kwargs: Any) -> bool:
    inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return all(t.untyped_storage().data_ptr() in inputs for t in outs)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: EmulatedNPUGraph) -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _HOST_READS:
            raise GraphCaptureError(f"aten.{name} reads device data on the host inside an NPU graph capture "
                                    "(a synchronization the capture does not allow)")
        out = func(*args, **kwargs)
        # A view aliases memory the capture fixed, an uninitialized allocation has no contents to redo (and
        # may be resized by a later op): nothing to run at replay. (Ops that may alias, e.g. aten.to, count
        # as views only when they did.)
        if not (func.is_view and _aliases_an_input(out, args, kwargs)) and name not in _UNINITIALIZED:
            self.graph._entries.append(_AtenEntry(func, _frozen(args), _frozen(kwargs), out))
        return out


_active: EmulatedNPUGraph | None = None  # the graph being captured (one capture at a time per process)


def active_capture() -> EmulatedNPUGraph | None:
    """The emulated graph being captured now, if any (the kernel emulation records into it)."""
    return _active


# ----------------------------------------------------------------------------------------------------
# the API
# ----------------------------------------------------------------------------------------------------


class _Pool:
    """An opaque pool token (memory pools are not emulated)."""


@dataclass
class EmulatedNPUGraph:
    """``torch_npu.npu.NPUGraph``: ``replay()``, ``update(cpu_update_input)``, ``pool()``."""

    auto_dispatch_capture: bool = False
    _entries: list[Any] = field(default_factory=list)
    _captured: bool = False
    _pool: Any = None

    def record_kernel(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run an emulated torch_npu kernel inside the capture as one recorded entry."""
        patched, torch.Tensor.tolist = torch.Tensor.tolist, _REAL_TOLIST  # type: ignore[method-assign]
        try:  # the kernel's own internals are the device's business, not the capture's
            with _disable_current_modes():
                out = fn(*args, **kwargs)
        finally:
            torch.Tensor.tolist = patched  # type: ignore[method-assign]
        self._entries.append(_KernelEntry(name, fn, _frozen(args), _frozen(kwargs), out,
                                          updatable=self.auto_dispatch_capture and name in UPDATABLE))
        return out

    def replay(self) -> None:
        _log("NPUGraph.replay", (), {})
        if not self._captured:
            raise RuntimeError("NPUGraph.replay: nothing captured (EMULATION)")
        with torch.inference_mode():
            for entry in self._entries:
                entry.run()

    def update(self, cpu_update_input: list[dict[str, Any]]) -> None:
        _log("NPUGraph.update", (), {"cpu_update_input": cpu_update_input})
        if not self.auto_dispatch_capture:
            raise RuntimeError("The current graph configuration does not support update,Try to capture by setting "
                               "auto_dispatch_capture=True during capture (EMULATION)")
        records = [e for e in self._entries if isinstance(e, _KernelEntry) and e.updatable]
        if len(cpu_update_input) == 1:
            cpu_update_input = [dict(cpu_update_input[0]) for _ in records]
        if len(cpu_update_input) != len(records):
            raise RuntimeError(f"Currently, there are {len(records)} operators that need to be updated by capture, "
                               f"and there are only {len(cpu_update_input)} elements in the incoming "
                               "cpu_update_input list (EMULATION)")
        for record, upd in zip(records, cpu_update_input):
            for key, value in upd.items():
                if key in record.kwargs and key in UPDATABLE[record.name]:
                    record.kwargs[key] = _frozen(value)

    def pool(self) -> Any:
        _log("NPUGraph.pool", (), {})
        return self._pool


_REAL_TOLIST = torch.Tensor.tolist


def _tolist_in_capture(self: torch.Tensor) -> Any:
    raise GraphCaptureError("Tensor.tolist reads device data on the host inside an NPU graph capture (a "
                            "synchronization the capture does not allow)")


class _GraphContext:
    """``torch_npu.npu.graph(npu_graph, pool=None, stream=None, auto_dispatch_capture=False, ...)``."""

    def __init__(self, npu_graph: EmulatedNPUGraph, pool: Any = None, stream: Any = None,
                 auto_dispatch_capture: bool = False, capture_error_mode: str = "global") -> None:
        self.graph = npu_graph
        self.graph.auto_dispatch_capture = auto_dispatch_capture
        self.graph._pool = pool if pool is not None else _Pool()
        self._mode = _Recorder(npu_graph)

    def __enter__(self) -> None:
        global _active
        if _active is not None:
            raise RuntimeError("another NPU graph capture is under way (EMULATION)")
        if self.graph._captured:
            raise RuntimeError("this NPUGraph already holds a capture (EMULATION)")
        _active = self.graph
        # Tensor.tolist reads the data without dispatching an aten op: on the device it is a synchronous copy
        self._tolist = torch.Tensor.tolist
        torch.Tensor.tolist = _tolist_in_capture  # type: ignore[method-assign]
        self._mode.__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        global _active
        try:
            self._mode.__exit__(exc_type, exc, tb)
        finally:  # whatever happened, the process gets its tolist back and no capture stays active
            torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
            _active = None
        self.graph._captured = exc_type is None


class _Stream:
    def wait_stream(self, stream: Any) -> None:
        _log("Stream.wait_stream", (stream,), {})


class _StreamContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class NpuNamespaceEmulation:
    """``torch_npu.npu`` as far as the backend's graph hook uses it (EMULATION)."""

    __name__ = "torch_npu.npu EMULATION (accel_backend_npu.emulation_graph, CPU)"
    _default = _Stream()

    def Stream(self, *args: Any, **kwargs: Any) -> _Stream:  # noqa: N802 (torch_npu's name)
        _log("npu.Stream", args, kwargs)
        return _Stream()

    def current_stream(self, *args: Any, **kwargs: Any) -> _Stream:
        _log("npu.current_stream", args, kwargs)
        return self._default

    def stream(self, *args: Any, **kwargs: Any) -> _StreamContext:
        _log("npu.stream", args, kwargs)
        return _StreamContext()

    def synchronize(self, *args: Any, **kwargs: Any) -> None:
        _log("npu.synchronize", args, kwargs)

    def graph_pool_handle(self, *args: Any, **kwargs: Any) -> _Pool:
        _log("npu.graph_pool_handle", args, kwargs)
        return _Pool()

    def NPUGraph(self, *args: Any, **kwargs: Any) -> EmulatedNPUGraph:  # noqa: N802
        _log("npu.NPUGraph", args, kwargs)
        return EmulatedNPUGraph(*args, **kwargs)

    def graph(self, *args: Any, **kwargs: Any) -> _GraphContext:
        _log("npu.graph", args, kwargs)
        return _GraphContext(*args, **kwargs)
