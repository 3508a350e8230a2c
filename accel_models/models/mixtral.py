"""Mixtral: Llama attention with a sparse MoE feed-forward in every layer (``block_sparse_moe``).

Also home of the pieces the other MoE families reuse: :class:`MixtralMoE` (router + stacked experts) and
:class:`MoEWeightsMixin` (per-expert and stacked checkpoint tensors -> the stacked parameters).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from accel_models.layers import FusedMoE, ReplicatedLinear
from accel_models.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from accel_models.models.utils import WeightLoadReport


#: HF hidden_act -> fused_experts activation (gelu is the erf form, as in the op)
_EXPERT_ACTIVATIONS = {"silu": "silu", "gelu": "gelu"}


class MixtralMoE(nn.Module):
    """Router (``gate``, replicated) and experts (``experts``, a :class:`FusedMoE`): ``[T, H]`` -> ``[T, H]``."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 renormalize: bool = True, hidden_act: str = "silu", prefix: str = "") -> None:
        super().__init__()
        if hidden_act not in _EXPERT_ACTIVATIONS:
            raise ValueError(f"{prefix}: hidden_act {hidden_act!r} is not supported for MoE experts; supported: "
                             f"{', '.join(_EXPERT_ACTIVATIONS)}")
        self.prefix = prefix
        self.hidden_size = hidden_size
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, prefix=f"{prefix}.gate")
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize=renormalize,
                                activation=_EXPERT_ACTIVATIONS[hidden_act], prefix=f"{prefix}.experts")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(hidden_states)  # [T, E]
        return self.experts(hidden_states, router_logits)


class MixtralAttention(LlamaAttention):
    pass


class MixtralDecoderLayer(LlamaDecoderLayer):
    attention_cls: ClassVar[type[nn.Module]] = MixtralAttention

    def _make_mlp(self, config: Any) -> None:
        self.block_sparse_moe = MixtralMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                                           config.intermediate_size, renormalize=True,
                                           hidden_act=config.hidden_act,
                                           prefix=f"{self.prefix}.block_sparse_moe")

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block_sparse_moe(hidden_states)

    def _whole_layer_op(self, ctx: Any) -> Any:
        """``moe_decoder_layer_decode`` (API 1.5) where the backend has a native one and this is the plain
        Mixtral layer it computes (see :meth:`_is_plain_moe`)."""
        fused = "moe_decoder_layer_decode" not in ctx.ops.composites and self._is_plain_moe(ctx)
        return ctx.ops.moe_decoder_layer_decode if fused else None

    def _is_plain_moe(self, ctx: Any) -> bool:
        """The layer ``moe_decoder_layer_decode`` computes: the plain attention, then this class's routed
        experts as they are: a router without bias, softmax top-k, SiLU experts, no expert groups, no
        scaling, every expert on this rank."""
        moe = getattr(self, "block_sparse_moe", None)
        if not (self._is_plain_attention(ctx) and type(self).feed_forward is MixtralDecoderLayer.feed_forward
                and type(moe) is MixtralMoE):
            return False
        experts = moe.experts
        return (type(experts).forward is FusedMoE.forward and type(moe.gate).forward is ReplicatedLinear.forward
                and moe.gate.bias is None
                and experts.scoring_func == "softmax" and experts.activation == "silu"
                and experts.num_expert_group is None and experts.routed_scaling_factor == 1.0
                and experts.expert_map is None and experts.num_local_experts == experts.num_experts)

    def _whole_layer_feed_forward(self) -> dict[str, Any]:
        moe = self.block_sparse_moe
        return {"router_weight": moe.gate.weight, "w13": moe.experts.w13_weight, "w2": moe.experts.w2_weight,
                "top_k": moe.experts.top_k, "renormalize": moe.experts.renormalize}


class MixtralModel(LlamaModel):
    decoder_layer_cls: ClassVar[type[nn.Module]] = MixtralDecoderLayer


class MoEWeightsMixin:
    """Loads MoE expert tensors into :class:`FusedMoE`'s stacked ``w13_weight`` / ``w2_weight``.

    Two checkpoint layouts are accepted:
    * per expert (published checkpoints, and what transformers 5.19's save_pretrained writes):
      ``<moe>.experts.<e>.<gate|up|down name>.weight``;
    * stacked (transformers 5's in-memory layout): ``<moe>.experts.gate_up_proj [E, 2 I, H]`` and
      ``<moe>.experts.down_proj [E, H, I]`` (with or without a ``.weight`` suffix).
    """

    #: checkpoint projection name -> FusedMoE shard id
    expert_projections: ClassVar[dict[str, str]] = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    _stacked_expert = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)(?:\.weight)?$")

    def _load_special(self, report: WeightLoadReport, name: str, tensor: torch.Tensor) -> bool:
        m = self._per_expert.search(name)
        if m is not None:
            base, expert_id, proj = m.group(1), int(m.group(2)), m.group(3)
            shard_id = self.expert_projections[proj]
            param = f"{base}.w2_weight" if shard_id == "w2" else f"{base}.w13_weight"
            report.load(name, param, tensor, shard_id, expert_id)
            return True
        m = self._stacked_expert.search(name)
        if m is not None:
            param = f"{m.group(1)}.{'w13_weight' if m.group(2) == 'gate_up_proj' else 'w2_weight'}"
            if report.param(param) is None:
                return False  # not an MoE layer of this model: reported as unexpected
            report.load(name, param, tensor)
            return True
        return False

    @property
    def _per_expert(self) -> re.Pattern[str]:
        cls = type(self)
        pattern = cls.__dict__.get("_per_expert_pattern")
        if pattern is None:
            names = "|".join(map(re.escape, self.expert_projections))
            pattern = re.compile(rf"^(.*\.experts)\.(\d+)\.({names})\.weight$")
            cls._per_expert_pattern = pattern  # type: ignore[attr-defined]
        return pattern


class MixtralForCausalLM(MoEWeightsMixin, LlamaForCausalLM):
    model_cls: ClassVar[type[nn.Module]] = MixtralModel
    expert_projections: ClassVar[dict[str, str]] = {"w1": "w1", "w3": "w3", "w2": "w2"}

    def _rename_checkpoint_weight(self, name: str) -> str:
        # transformers 5's in-memory naming puts Mixtral's MoE under `mlp`; published checkpoints and vLLM
        # use `block_sparse_moe`.
        return re.sub(r"\.mlp\.(gate|experts)\.", r".block_sparse_moe.\1.", name)
