"""Mixture of experts: routing (op ``moe_topk``) and stacked experts (op ``fused_experts``).

Experts are stored stacked, as the op wants them: ``w13_weight [E_local, 2 I_local, H]`` (each expert's gate
projection over its up projection) and ``w2_weight [E_local, H, I_local]``. Checkpoints hold one tensor per
expert and projection; ``weight_loader(param, w, shard_id, expert_id)`` with ``shard_id`` ``"w1"`` (gate),
``"w3"`` (up) or ``"w2"`` (down) copies it into place. ``shard_id=None, expert_id=None`` takes a whole stacked
tensor (transformers 5's fused ``gate_up_proj [E, 2 I, H]`` / ``down_proj [E, H, I]``).

Parallelism over the TP group:
* tensor parallel (default): every rank holds every expert with the intermediate dim sliced
  (``I_local = I / tp``); partial outputs are all-reduced.
* expert parallel (``ep_enabled``): whole experts are assigned to ranks in contiguous runs (the first
  ``E % tp`` ranks take one more); ``fused_experts`` gets an ``expert_map`` (global id -> local index, -1
  elsewhere) and the per-rank partial sums are all-reduced.
"""

from __future__ import annotations

import torch
from torch import nn

from accel_models.context import get_build_context
from accel_models.layers.utils import divide, expect_shards, mark_loaded, new_param, set_weight_attrs


def expert_range(num_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    """The ``[start, end)`` global expert ids rank ``rank`` holds under expert parallelism."""
    base, rem = divmod(num_experts, world_size)
    start = rank * base + min(rank, rem)
    return start, start + base + (1 if rank < rem else 0)


class FusedMoE(nn.Module):
    """``forward(hidden_states [T, H], router_logits [T, E], e_score_correction_bias=None)`` -> ``[T, H]``.

    ``e_score_correction_bias`` (``[E]``, DeepSeek-V3's ``noaux_tc`` routing) is owned by the router, which
    the checkpoint names it under, and is passed at each call.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 renormalize: bool = True, scoring_func: str = "softmax", activation: str = "silu",
                 reduce_results: bool = True, num_expert_group: int | None = None, topk_group: int | None = None,
                 routed_scaling_factor: float = 1.0, prefix: str = "") -> None:
        super().__init__()
        ctx = get_build_context()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"{prefix}: top_k ({top_k}) must be in [1, num_experts={num_experts}]")
        self.prefix = prefix
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        self.scoring_func = scoring_func
        self.activation = activation
        self.reduce_results = reduce_results
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.tp_group = ctx.tp_group
        self.tp_rank, self.tp_size = ctx.tp_group.rank, ctx.tp_group.world_size
        self.ep_enabled = ctx.ep_enabled and self.tp_size > 1
        self._moe_topk = ctx.ops.moe_topk
        self._fused_experts = ctx.ops.fused_experts

        if self.ep_enabled:
            if num_experts < self.tp_size:
                raise ValueError(f"{prefix}: expert parallelism needs at least one expert per rank "
                                 f"({num_experts} experts, {self.tp_size} ranks)")
            self.expert_start, self.expert_end = expert_range(num_experts, self.tp_rank, self.tp_size)
            self.intermediate_size_per_partition = intermediate_size
            expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
            expert_map[self.expert_start : self.expert_end] = torch.arange(self.expert_end - self.expert_start,
                                                                           dtype=torch.int32)
            self.register_buffer("expert_map", expert_map.to(ctx.device), persistent=False)
        else:
            self.expert_start, self.expert_end = 0, num_experts
            self.intermediate_size_per_partition = divide(intermediate_size, self.tp_size,
                                                          f"{prefix}: MoE intermediate size")
            self.expert_map = None
        self.num_local_experts = self.expert_end - self.expert_start
        inter = self.intermediate_size_per_partition
        self.w13_weight = new_param(ctx, self.num_local_experts, 2 * inter, hidden_size)
        self.w2_weight = new_param(ctx, self.num_local_experts, hidden_size, inter)
        for param, shards in ((self.w13_weight, ("w1", "w3")), (self.w2_weight, ("w2",))):
            set_weight_attrs(param, {"weight_loader": self.weight_loader})
            expect_shards(param, {(e, s) for e in range(num_experts) for s in shards})

    # -- loading --------------------------------------------------------------------------------------

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None,
                      expert_id: int | None = None) -> None:
        is_w13 = param is self.w13_weight
        if shard_id is None and expert_id is None:  # a whole stacked tensor [E, 2I, H] or [E, H, I]
            full = (self.num_experts, 2 * self.intermediate_size, self.hidden_size) if is_w13 else \
                   (self.num_experts, self.hidden_size, self.intermediate_size)
            if tuple(loaded_weight.shape) != full:
                raise ValueError(f"shape mismatch ({self.prefix}): stacked checkpoint tensor has shape "
                                 f"{tuple(loaded_weight.shape)}, expected {full}")
            inter = self.intermediate_size
            for e in range(self.num_experts):
                if not self.expert_start <= e < self.expert_end:  # another rank's expert: not even read
                    for s in (("w1", "w3") if is_w13 else ("w2",)):
                        mark_loaded(param, (e, s))
                    continue
                if is_w13:
                    self.weight_loader(param, loaded_weight[e, :inter], "w1", e)
                    self.weight_loader(param, loaded_weight[e, inter:], "w3", e)
                else:
                    self.weight_loader(param, loaded_weight[e], "w2", e)
            return
        if shard_id not in ("w1", "w2", "w3") or expert_id is None:
            raise ValueError(f"{self.prefix}: weight_loader needs shard_id in 'w1', 'w2', 'w3' and an expert_id "
                             f"(got {shard_id!r}, {expert_id!r})")
        if (shard_id == "w2") == is_w13:
            raise ValueError(f"{self.prefix}: shard {shard_id!r} does not belong in "
                             f"{'w13_weight' if is_w13 else 'w2_weight'}")
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"{self.prefix}: expert id {expert_id} out of range (the model has "
                             f"{self.num_experts} experts)")
        full = (self.intermediate_size, self.hidden_size) if shard_id != "w2" else (self.hidden_size, self.intermediate_size)
        if tuple(loaded_weight.shape) != full:
            raise ValueError(f"shape mismatch ({self.prefix} expert {expert_id} {shard_id}): checkpoint tensor has "
                             f"shape {tuple(loaded_weight.shape)}, expected {full}")
        mark_loaded(param, (expert_id, shard_id))
        if not self.expert_start <= expert_id < self.expert_end:
            return  # another rank holds this expert
        local = expert_id - self.expert_start
        inter = self.intermediate_size_per_partition
        start = 0 if self.ep_enabled else self.tp_rank * inter
        if shard_id == "w2":  # [H, I]: slice the intermediate (input) dim
            param.data[local].copy_(loaded_weight.narrow(1, start, inter))
        else:  # [I, H]: gate rows go first, up rows second
            offset = 0 if shard_id == "w1" else inter
            param.data[local, offset : offset + inter].copy_(loaded_weight.narrow(0, start, inter))

    # -- forward --------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                e_score_correction_bias: torch.Tensor | None = None) -> torch.Tensor:
        topk_weights, topk_ids = self._moe_topk(
            router_logits=router_logits, top_k=self.top_k, scoring_func=self.scoring_func,
            renormalize=self.renormalize, num_expert_group=self.num_expert_group, topk_group=self.topk_group,
            e_score_correction_bias=e_score_correction_bias, routed_scaling_factor=self.routed_scaling_factor,
        )
        out = self._fused_experts(
            hidden_states=hidden_states, w13=self.w13_weight, w2=self.w2_weight, topk_weights=topk_weights,
            topk_ids=topk_ids, activation=self.activation, expert_map=self.expert_map,
        )
        if self.reduce_results and self.tp_size > 1:
            out = self.tp_group.all_reduce(out)
        return out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts} (local {self.num_local_experts}), top_k={self.top_k}, "
                f"hidden={self.hidden_size}, intermediate={self.intermediate_size} "
                f"(local {self.intermediate_size_per_partition}), ep={self.ep_enabled}")


__all__ = ["FusedMoE", "expert_range"]
