"""Qwen2-MoE: Qwen2 attention; sparse layers (``config.is_moe_layer``) route over ``num_experts`` experts and
add a shared expert scaled by ``sigmoid(shared_expert_gate(x))``; other layers are dense Qwen2 MLPs."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from accel_models.layers import ReplicatedLinear
from accel_models.models.mixtral import MixtralMoE, MoEWeightsMixin
from accel_models.models.qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2MLP, Qwen2Model


class Qwen2MoeSparseMoeBlock(MixtralMoE):
    """Routed experts (softmax, renormalized iff ``norm_topk_prob``) plus an optional gated shared expert."""

    def __init__(self, config: Any, *, prefix: str = "") -> None:
        super().__init__(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                         config.moe_intermediate_size, renormalize=config.norm_topk_prob,
                         hidden_act=config.hidden_act, prefix=prefix)
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        if shared > 0:
            self.shared_expert = Qwen2MLP(config.hidden_size, shared, config.hidden_act,
                                          prefix=f"{prefix}.shared_expert")
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False,
                                                       prefix=f"{prefix}.shared_expert_gate")
        else:
            self.shared_expert = None
            self.shared_expert_gate = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden_states)
        if self.shared_expert is not None:
            gate, _ = self.shared_expert_gate(hidden_states)  # [T, 1]
            out = out + torch.sigmoid(gate) * self.shared_expert(hidden_states)
        return out


class Qwen2MoeAttention(Qwen2Attention):
    pass


class Qwen2MoeDecoderLayer(Qwen2DecoderLayer):
    attention_cls: ClassVar[type[nn.Module]] = Qwen2MoeAttention
    sparse_block_cls: ClassVar[type[nn.Module]] = Qwen2MoeSparseMoeBlock

    def _make_mlp(self, config: Any) -> None:
        if config.is_moe_layer(self.layer_idx):
            self.mlp = self.sparse_block_cls(config, prefix=f"{self.prefix}.mlp")
        else:
            self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                                prefix=f"{self.prefix}.mlp")


class Qwen2MoeModel(Qwen2Model):
    decoder_layer_cls: ClassVar[type[nn.Module]] = Qwen2MoeDecoderLayer


class Qwen2MoeForCausalLM(MoEWeightsMixin, Qwen2ForCausalLM):
    model_cls: ClassVar[type[nn.Module]] = Qwen2MoeModel
