"""Tensor and expert parallelism over ``torch.distributed``: the group layers shard over, and the launcher.

* :class:`TorchDistGroup` is the :class:`~accel_models.context.ParallelGroup` over a ``torch.distributed``
  process group. Its collective backend is the one the selected accel backend names in its
  ``BackendInfo.dist_backend`` (gloo for the reference backend on CPU; nccl, hccl, eccl on accelerators).
* :class:`DistributedExecutor` spawns one process per rank (``torch.multiprocessing``, spawn), joins them in
  one process group and runs a *worker* in each. The calling process is the **driver**: it is not a rank,
  it holds no weights and never joins the group. It sends every call to all ranks over a pipe, each rank
  runs it (collectives included) and the driver returns rank 0's result.
* :class:`TPModelRunner` is the driver-side twin of :class:`~accel_models.runner.ModelRunner`: the same
  ``execute`` / ``step`` / ``forward_sequences`` over a model sharded across ranks. ``accel_models.LLM(...,
  tensor_parallel_size=N)`` drives one.

Failure and shutdown:

* A rank that raises (or dies) fails the call: the driver raises :class:`RankError` carrying that rank's
  exception type, message and traceback, then terminates every rank (the others may be blocked in a
  collective waiting for it) and closes the group. The executor is unusable afterwards; launch a new one.
* :meth:`DistributedExecutor.shutdown` (also on leaving its ``with`` block, on garbage collection and at
  interpreter exit) asks each rank to leave its loop, destroy its process group and exit; a rank that does
  not exit in time is killed. No process and no port outlives it.
* The rendezvous store (a ``TCPStore``) is hosted by the driver on a port the OS picks (port 0), so two
  executors never race for a port, and the port is released at shutdown.

Ranks are started with the ``spawn`` method: a script that launches them must guard its entry point with
``if __name__ == "__main__":`` (each rank imports the main module), as with vLLM and torch.multiprocessing.

Messages are pickled by value (``pickle.dumps``): tensors are copied through the pipe, never shared through
shared memory, so a rank's exit cannot invalidate a result the driver holds.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import os
import pickle
import signal
import sys
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from accel_models.context import ParallelGroup

#: seconds the ranks get to build their model and join the group
DEFAULT_STARTUP_TIMEOUT = 300.0
#: how long a collective waits for its peers (the driver kills the ranks sooner when one fails)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
#: seconds a rank gets to exit after shutdown before it is killed
DEFAULT_EXIT_TIMEOUT = 10.0


# ----------------------------------------------------------------------------------------------------
# The process group as a ParallelGroup
# ----------------------------------------------------------------------------------------------------


class TorchDistGroup(ParallelGroup):
    """A :class:`ParallelGroup` over a ``torch.distributed`` process group (None: the default group)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first "
                               "(accel_models.distributed.DistributedExecutor does it for each rank)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world_size == 1:
            return x
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        import torch.distributed as dist

        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def __repr__(self) -> str:
        return f"TorchDistGroup(rank={self.rank}, world_size={self.world_size})"


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


class RankError(RuntimeError):
    """A rank failed a call (raised an exception, or died).

    Attributes:
        rank: the failing rank.
        exc_type: the name of the exception it raised ("" when it died without one).
        remote_traceback: its formatted traceback, as text.
    """

    def __init__(self, message: str, *, rank: int, exc_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> Any:  # keep the attributes through pickling
        return (_rebuild_rank_error, (str(self), self.rank, self.exc_type, self.remote_traceback))


def _rebuild_rank_error(message: str, rank: int, exc_type: str, tb: str) -> RankError:
    return RankError(message, rank=rank, exc_type=exc_type, remote_traceback=tb)


# ----------------------------------------------------------------------------------------------------
# The rank side
# ----------------------------------------------------------------------------------------------------


def _send(conn: Connection, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _error_reply(rank: int, exc: BaseException) -> tuple[Any, ...]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)  # some exceptions pickle but do not unpickle (required __init__ arguments)
    except Exception:
        blob = None
    return ("error", rank, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), tb, blob)


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the driver dies, even by SIGKILL (best effort elsewhere)."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(rank: int, world_size: int, store_host: str, store_port: int, dist_backend: str,
                 conn: Connection, factory: Callable[..., Any], factory_kwargs: dict[str, Any],
                 num_threads: int | None, timeout_s: float) -> None:
    """Body of one rank: join the group, build the worker, then serve calls until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _die_with_parent()
    import torch.distributed as dist

    if num_threads:
        torch.set_num_threads(num_threads)
    worker = None
    try:
        try:
            timeout = datetime.timedelta(seconds=timeout_s)
            store = dist.TCPStore(store_host, store_port, world_size, False, timeout)
            # Collectives may wait long for a slow peer; a failed or dead peer is the driver's to detect.
            dist.init_process_group(dist_backend, store=store, rank=rank, world_size=world_size,
                                    timeout=max(timeout, COLLECTIVE_TIMEOUT))
            worker = factory(rank=rank, world_size=world_size, group=TorchDistGroup(), **factory_kwargs)
        except BaseException as exc:
            _send(conn, _error_reply(rank, exc))
            return
        _send(conn, ("ok", rank, None))
        while True:
            try:
                msg = _recv(conn)
            except (EOFError, OSError):
                return  # the driver is gone
            if msg is None:
                return
            method, args, kwargs, want_all = msg
            try:
                fn = getattr(worker, method) if isinstance(method, str) else (lambda *a, **k: method(worker, *a, **k))
                result = fn(*args, **kwargs)
                _send(conn, ("ok", rank, result if (rank == 0 or want_all) else None))
            except BaseException as exc:
                _send(conn, _error_reply(rank, exc))
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        if worker is not None and hasattr(worker, "close"):
            with contextlib.suppress(Exception):
                worker.close()
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# The driver side
# ----------------------------------------------------------------------------------------------------


_LIVE: weakref.WeakSet[DistributedExecutor] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for ex in list(_LIVE):
        with contextlib.suppress(Exception):
            ex.shutdown()


class DistributedExecutor:
    """Spawns ``world_size`` ranks, each running ``factory(rank=, world_size=, group=, **factory_kwargs)``.

    Args:
        world_size: number of ranks (processes).
        factory: a picklable callable (a module-level class or function) that builds the per-rank worker;
            it gets ``rank``, ``world_size`` and ``group`` (a :class:`TorchDistGroup`) as keywords.
        factory_kwargs: further keywords for ``factory`` (picklable).
        dist_backend: the ``torch.distributed`` backend (None: the selected accel backend's
            ``BackendInfo.dist_backend``, gloo for the reference backend).
        num_threads: torch threads per rank (None: on a CPU backend the cores split evenly over the ranks).
        startup_timeout: seconds the ranks get to start (model loading included).

    :meth:`call` runs a worker method on every rank and returns rank 0's result; :meth:`call_all` returns
    every rank's. Use it as a context manager, or call :meth:`shutdown`.
    """

    def __init__(self, world_size: int, factory: Callable[..., Any], factory_kwargs: Mapping[str, Any] | None = None,
                 *, dist_backend: str | None = None, backend: str | None = None, num_threads: int | None = None,
                 startup_timeout: float = DEFAULT_STARTUP_TIMEOUT) -> None:
        import torch.distributed as dist
        import torch.multiprocessing as tmp

        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed; tensor parallelism needs it")
        device_type = "cpu"
        if dist_backend is None or num_threads is None:
            from accel_models.backends import get_backend

            info = get_backend(backend)
            device_type = info.device_type
            dist_backend = dist_backend or info.dist_backend
        if num_threads is None and device_type == "cpu":
            num_threads = max(1, (os.cpu_count() or 1) // world_size)
        self.world_size = world_size
        self.dist_backend = dist_backend
        self._closed = False
        self._failed: RankError | None = None
        self._procs: list[Any] = []
        self._pids: list[int] = []
        self._conns: list[Connection] = []
        timeout = datetime.timedelta(seconds=startup_timeout)
        # The driver hosts the rendezvous store on a port the OS picks: no race for a "free" port.
        self._store: Any = dist.TCPStore("127.0.0.1", 0, None, True, timeout, wait_for_workers=False)
        self.port: int = self._store.port
        ctx = tmp.get_context("spawn")
        _LIVE.add(self)
        try:
            for rank in range(world_size):
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=_worker_main, name=f"accel-models-rank{rank}", daemon=True,
                    args=(rank, world_size, "127.0.0.1", self.port, dist_backend, child, factory,
                          dict(factory_kwargs or {}), num_threads, startup_timeout),
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._pids.append(proc.pid)
                self._conns.append(parent)
            self._collect("startup", want_all=False, timeout=startup_timeout)
        except BaseException:
            self._terminate()
            raise

    # -- properties ------------------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids (rank order; still readable after shutdown)."""
        return list(self._pids)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- calls -----------------------------------------------------------------------------------------

    def call(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``worker.method(*args, **kwargs)`` (or ``method(worker, *args, **kwargs)`` for a picklable
        callable) on every rank; returns rank 0's result. Raises :class:`RankError` if a rank fails."""
        return self._call(method, args, kwargs, want_all=False)[0]

    def call_all(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Like :meth:`call`, returning every rank's result (rank order)."""
        return self._call(method, args, kwargs, want_all=True)

    def _call(self, method: str | Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              want_all: bool) -> list[Any]:
        if self._failed is not None:
            raise RuntimeError(f"this executor was shut down after rank {self._failed.rank} failed "
                               f"({self._failed}); launch a new one") from self._failed
        if self._closed:
            raise RuntimeError("this executor was shut down; launch a new one")
        try:
            blob = pickle.dumps((method, args, kwargs, want_all), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(f"the arguments of {method!r} cannot be sent to the ranks (not picklable): {exc}") from exc
        name = method if isinstance(method, str) else getattr(method, "__qualname__", repr(method))
        try:
            for conn in self._conns:
                conn.send_bytes(blob)
            return self._collect(name, want_all=want_all, timeout=None)
        except BaseException as exc:
            if not isinstance(exc, RankError):  # e.g. KeyboardInterrupt while waiting: ranks are mid-call
                self._terminate()
            raise

    def _collect(self, what: str, *, want_all: bool, timeout: float | None) -> list[Any]:
        """Wait for one reply per rank; on the first error or death, tear everything down and raise."""
        results: list[Any] = [None] * self.world_size
        pending = set(range(self.world_size))
        by_conn = {c: r for r, c in enumerate(self._conns)}
        by_sentinel = {p.sentinel: r for r, p in enumerate(self._procs)}
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending], left)
            if not ready:
                self._fail(RankError(f"{what}: ranks {sorted(pending)} did not answer within {timeout:.0f} s",
                                     rank=min(pending)))
            # Replies first: a rank that reported an error and then exited must be reported by its error.
            for obj in sorted(ready, key=lambda o: o not in by_conn):
                if obj in by_conn:
                    rank = by_conn[obj]
                    if rank not in pending:
                        continue
                    try:
                        reply = _recv(obj)
                    except (EOFError, OSError):
                        continue  # its sentinel tells how it ended
                    if reply[0] == "ok":
                        results[rank] = reply[2]
                        pending.discard(rank)
                    else:
                        self._fail(self._rank_error(what, reply))
                else:
                    rank = by_sentinel[obj]
                    if rank not in pending:
                        continue
                    proc = self._procs[rank]
                    proc.join(0.1)
                    self._fail(RankError(f"rank {rank} died during {what} (exit code {proc.exitcode}) without "
                                         "reporting an error (killed, out of memory, or a crash in native code)",
                                         rank=rank))
        return results

    def _rank_error(self, what: str, reply: tuple[Any, ...]) -> RankError:
        _, rank, exc_type, message, tb, blob = reply
        err = RankError(f"rank {rank} failed in {what}: {exc_type}: {message}\n"
                        f"--- traceback of rank {rank} ---\n{tb.rstrip()}",
                        rank=rank, exc_type=exc_type, remote_traceback=tb)
        if blob is not None:
            with contextlib.suppress(Exception):
                err.__cause__ = pickle.loads(blob)
        return err

    def _fail(self, err: RankError) -> None:
        self._failed = err
        self._terminate()
        raise err

    # -- shutdown --------------------------------------------------------------------------------------

    def shutdown(self, timeout: float = DEFAULT_EXIT_TIMEOUT) -> None:
        """Stop every rank (each destroys its process group and exits) and release the store's port.
        Idempotent."""
        if self._closed:
            return
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.send_bytes(pickle.dumps(None))
        self._terminate(grace=timeout)

    def _terminate(self, grace: float = 0.0) -> None:
        """Make sure no rank survives: wait ``grace`` seconds, then SIGTERM, then SIGKILL."""
        import time

        if self._closed:
            return
        deadline = time.monotonic() + grace
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.close()
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._store = None  # closes the rendezvous port
        self._closed = True
        _LIVE.discard(self)

    def __enter__(self) -> DistributedExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:  # also runs at interpreter exit, when module globals may already be gone
            if not getattr(self, "_closed", True):
                self.shutdown()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------------
# A sharded model: the rank-side worker and the driver-side runner
# ----------------------------------------------------------------------------------------------------


def _to_device(md: Any, device: torch.device) -> Any:
    changes = {f.name: getattr(md, f.name).to(device) for f in dataclasses.fields(md)
               if isinstance(getattr(md, f.name), torch.Tensor)}
    return dataclasses.replace(md, **changes)


def _own(x: Any) -> Any:
    """A tensor with its own compact storage (pickling a view would send the whole base buffer)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _own(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


class ModelWorker:
    """What each rank runs: its shard of the model (``load_model`` with the rank's group) and a
    :class:`~accel_models.runner.ModelRunner` over it (after :meth:`init_runner`)."""

    def __init__(self, *, rank: int, world_size: int, group: ParallelGroup, model_path: str,
                 backend: str | None = None, dtype: Any = None, device: Any = None,
                 enable_expert_parallel: bool = False) -> None:
        from accel_models.backends import resolve_ops
        from accel_models.loader import load_model

        self.rank, self.world_size = rank, world_size
        self.ops = resolve_ops(backend)
        self.group = group
        target = torch.device(device if device is not None else self.ops.device_type)
        if target.type != "cpu" and target.index is None:  # one accelerator per rank
            target = torch.device(target.type, rank)
            module = getattr(torch, target.type, None)
            if module is not None and hasattr(module, "set_device"):
                module.set_device(target)
        device = target
        self.model = load_model(model_path, dtype=dtype, device=device, ops=self.ops, tp_group=group,
                                ep_enabled=enable_expert_parallel)
        self.runner: Any = None

    def model_info(self) -> dict[str, Any]:
        """This rank's view: dtype, device, its attention layers' KV heads, parameter counts and bytes."""
        from accel_models.layers.attention import Attention

        params = list(self.model.parameters())
        return {
            "rank": self.rank,
            "dtype": params[0].dtype,
            "device": str(params[0].device),
            "attention": [(m.prefix, m.num_kv_heads, m.head_size) for m in self.model.modules()
                          if isinstance(m, Attention)],
            "param_numel": sum(p.numel() for p in params),
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "param_shapes": {n: tuple(p.shape) for n, p in self.model.named_parameters()},
        }

    def init_runner(self, **kwargs: Any) -> int:
        """Build this rank's ModelRunner (KV caches for its heads); returns its number of blocks."""
        from accel_models.runner import ModelRunner

        self.runner = ModelRunner(self.model, **kwargs)
        return self.runner.num_blocks

    def _need_runner(self) -> Any:
        if self.runner is None:
            raise RuntimeError("init_runner was not called on this rank")
        return self.runner

    def execute(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any,
                logits_indices: torch.Tensor | None = None, *, float_logits: bool = True) -> torch.Tensor | None:
        runner = self._need_runner()
        md = _to_device(attn_metadata, runner.device)
        logits = runner.execute(input_ids, positions, md, logits_indices, float_logits=float_logits)
        return logits.cpu() if self.rank == 0 else None

    def step(self, batch: Mapping[Any, Sequence[int]]) -> dict[Any, torch.Tensor] | None:
        out = self._need_runner().step(batch)
        return {k: v.cpu() for k, v in out.items()} if self.rank == 0 else None

    def forward_sequences(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor] | None:
        out = self._need_runner().forward_sequences(sequences)
        return [t.cpu() for t in out] if self.rank == 0 else None

    def free(self, seq_id: Any) -> None:
        self._need_runner().free(seq_id)

    def reset(self) -> None:
        self._need_runner().reset()


class TPModelRunner:
    """A model sharded over ``tensor_parallel_size`` ranks, driven like a :class:`ModelRunner`.

    Args:
        model_path: checkpoint directory (config.json + safetensors); each rank reads only its shard.
        tensor_parallel_size: number of ranks.
        enable_expert_parallel: MoE layers hold whole experts per rank instead of a slice of every expert.
        backend, dtype, device: as in :func:`~accel_models.load_model` (device None: ``<type>:<rank>`` on an
            accelerator, the CPU otherwise).
        runner_kwargs: ModelRunner keywords (num_blocks, block_size, kv_cache_dtype, max_model_len); None
            to build the runners later with :meth:`init_runner`.
        num_threads: torch threads per rank (None: the CPU cores split over the ranks).

    Results (logits) come back from rank 0, on the CPU. Raises :class:`RankError` when a rank fails (the
    ranks are stopped). Use as a context manager or call :meth:`shutdown`.
    """

    def __init__(self, model_path: str | os.PathLike[str], tensor_parallel_size: int = 2, *,
                 enable_expert_parallel: bool = False, backend: str | None = None, dtype: Any = None,
                 device: Any = None, runner_kwargs: Mapping[str, Any] | None = None,
                 num_threads: int | None = None, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT) -> None:
        from accel_models.backends import get_backend
        from accel_models.loader import find_checkpoint_files

        path = Path(model_path)
        find_checkpoint_files(path)  # a bad path fails here, clearly, before any process starts
        info = get_backend(backend)  # a bad backend name too
        self.model_path = path
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_expert_parallel = enable_expert_parallel
        self.executor = DistributedExecutor(
            tensor_parallel_size, ModelWorker,
            dict(model_path=str(path), backend=info.name, dtype=dtype, device=device,
                 enable_expert_parallel=enable_expert_parallel),
            backend=info.name, num_threads=num_threads, startup_timeout=startup_timeout,
        )
        self.num_blocks: int | None = None
        if runner_kwargs is not None:
            self.init_runner(**runner_kwargs)

    def model_info(self, all_ranks: bool = False) -> Any:
        """Rank 0's (or every rank's) dtype, device, attention layers (prefix, KV heads, head size) and
        parameter counts/bytes/shapes."""
        return self.executor.call_all("model_info") if all_ranks else self.executor.call("model_info")

    def init_runner(self, **runner_kwargs: Any) -> int:
        """Build each rank's ModelRunner (same keywords as :class:`ModelRunner`); returns the blocks per layer."""
        self.num_blocks = self.executor.call("init_runner", **runner_kwargs)
        return self.num_blocks

    def execute(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any,
                logits_indices: torch.Tensor | None = None, *, float_logits: bool = True) -> torch.Tensor:
        """:meth:`ModelRunner.execute` over the ranks; rank 0's logits (float32 unless ``float_logits`` is
        False), on the CPU."""
        return self.executor.call("execute", _own(input_ids), _own(positions), _own(attn_metadata),
                                  _own(logits_indices), float_logits=float_logits)

    def step(self, batch: Mapping[Any, Sequence[int]]) -> dict[Any, torch.Tensor]:
        return self.executor.call("step", {k: [int(t) for t in v] for k, v in batch.items()})

    def forward_sequences(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return self.executor.call("forward_sequences", [[int(t) for t in s] for s in sequences])

    def free(self, seq_id: Any) -> None:
        self.executor.call("free", seq_id)

    def reset(self) -> None:
        self.executor.call("reset")

    def shutdown(self) -> None:
        self.executor.shutdown()

    def __enter__(self) -> TPModelRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


__all__ = [
    "DistributedExecutor",
    "ModelWorker",
    "RankError",
    "TPModelRunner",
    "TorchDistGroup",
]
