"""The per-rank side of test_model_tp2_gloo (kept free of pytest/transformers imports: spawned children
import this module, so it must be cheap)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from accel_models.context import ParallelGroup


class GlooGroup(ParallelGroup):
    """The default torch.distributed group as the layers' TP group."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)


def worker(rank: int, init_file: str, jobs: list[tuple[str, bool, str]], sequences: list[list[int]]) -> None:
    """Load each ``(checkpoint, ep_enabled, output file)`` sharded over 2 ranks; rank 0 saves the logits."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from accel_models.loader import load_model
        from accel_models.runner import ModelRunner

        for path, ep, out_file in jobs:
            model = load_model(path, backend="reference", dtype="float32", device="cpu", tp_group=GlooGroup(),
                               ep_enabled=ep)
            logits = ModelRunner(model).forward_sequences(sequences)
            if rank == 0:
                torch.save(logits, out_file)
    finally:
        dist.destroy_process_group()
