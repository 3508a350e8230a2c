"""Functions the distributed tests run *on the ranks* (``executor.call(fn, ...)`` pickles them by reference,
so they live in a module the spawned ranks can import: no transformers, no pytest)."""

from __future__ import annotations

import os
from typing import Any

import torch


def load_on_rank(worker: Any, path: str, ep: bool) -> None:
    """Replace the rank's model by ``path``'s (sharded over the same group), with a fresh runner: one launch
    then serves several checkpoints."""
    from accel_models.loader import load_model

    worker.runner = None
    worker.model = load_model(path, dtype="float32", ops=worker.ops, tp_group=worker.group, ep_enabled=ep)
    worker.init_runner()


def get_param(worker: Any, name: str) -> torch.Tensor:
    """This rank's copy of parameter ``name``."""
    return dict(worker.model.named_parameters())[name].detach().clone()


class EchoWorker:
    """A worker without a model, for launch/failure tests."""

    def __init__(self, *, rank: int, world_size: int, group: Any) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group

    def rank_sum(self) -> float:
        """All-reduce of ``rank + 1`` over the group (a real collective)."""
        return float(self.group.all_reduce(torch.tensor([self.rank + 1.0]))[0])

    def pid(self) -> int:
        return os.getpid()


def fail_on_rank(worker: Any, rank: int, message: str) -> float:
    """``rank`` raises; every other rank blocks in an all-reduce that the failing rank never joins."""
    if worker.rank == rank:
        raise ValueError(message)
    return float(worker.group.all_reduce(torch.ones(1))[0])


def exit_on_rank(worker: Any, rank: int) -> None:
    """``rank`` dies without a word (as if killed); the others wait in a collective."""
    if worker.rank == rank:
        os._exit(3)
    worker.group.all_reduce(torch.ones(1))
