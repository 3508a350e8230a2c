"""Qwen3: Qwen2 with RMSNorm over each head of q and k (before rotary) and no qkv bias by default."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from accel_models.layers import RMSNorm
from accel_models.models.qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model


class Qwen3Attention(Qwen2Attention):
    def __init__(self, config: Any, *, prefix: str = "") -> None:
        super().__init__(config, prefix=prefix)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, prefix=f"{prefix}.q_norm")
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, prefix=f"{prefix}.k_norm")

    def _qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [T, H * D] -> per-head norm over D -> [T, H * D]
        q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).reshape(q.shape)
        k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).reshape(k.shape)
        return q, k


class Qwen3DecoderLayer(Qwen2DecoderLayer):
    attention_cls: ClassVar[type[nn.Module]] = Qwen3Attention


class Qwen3Model(Qwen2Model):
    decoder_layer_cls: ClassVar[type[nn.Module]] = Qwen3DecoderLayer


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    model_cls: ClassVar[type[nn.Module]] = Qwen3Model
