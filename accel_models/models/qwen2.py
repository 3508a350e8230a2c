"""Qwen2: Llama with a bias on the q/k/v projections and a per-layer sliding window (HF's ``layer_types``).

The bias flags and the window come from the config (``qkv_proj_bias``, ``sliding_window_for_layer``), so
the modules are Llama's; the subclasses exist for the names (and as the parents of Qwen3 / Qwen2-MoE).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from accel_models.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel


class Qwen2MLP(LlamaMLP):
    pass


class Qwen2Attention(LlamaAttention):
    pass


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls: ClassVar[type[nn.Module]] = Qwen2Attention


class Qwen2Model(LlamaModel):
    decoder_layer_cls: ClassVar[type[nn.Module]] = Qwen2DecoderLayer


class Qwen2ForCausalLM(LlamaForCausalLM):
    model_cls: ClassVar[type[nn.Module]] = Qwen2Model
