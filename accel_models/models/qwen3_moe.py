"""Qwen3-MoE: Qwen3 attention (q/k norm) with Qwen2-MoE's sparse layers, without a shared expert."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from accel_models.models.qwen2_moe import Qwen2MoeDecoderLayer, Qwen2MoeForCausalLM, Qwen2MoeModel, Qwen2MoeSparseMoeBlock
from accel_models.models.qwen3 import Qwen3Attention


class Qwen3MoeSparseMoeBlock(Qwen2MoeSparseMoeBlock):
    """Routed experts only (Qwen3-MoE configs have no ``shared_expert_intermediate_size``)."""


class Qwen3MoeAttention(Qwen3Attention):
    pass


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    attention_cls: ClassVar[type[nn.Module]] = Qwen3MoeAttention
    sparse_block_cls: ClassVar[type[nn.Module]] = Qwen3MoeSparseMoeBlock


class Qwen3MoeModel(Qwen2MoeModel):
    decoder_layer_cls: ClassVar[type[nn.Module]] = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    model_cls: ClassVar[type[nn.Module]] = Qwen3MoeModel
