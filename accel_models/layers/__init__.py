"""Hardware-neutral layers: each binds its ops once, at construction, from the build context."""

from accel_models.layers.activation import GeluAndMul, SiluAndMul, get_act_and_mul
from accel_models.layers.attention import Attention
from accel_models.layers.fused_moe import FusedMoE
from accel_models.layers.layernorm import RMSNorm
from accel_models.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from accel_models.layers.logits_processor import LogitsProcessor
from accel_models.layers.rotary_embedding import RotaryEmbedding, get_rope
from accel_models.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "FusedMoE",
    "GeluAndMul",
    "LinearBase",
    "LogitsProcessor",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiluAndMul",
    "VocabParallelEmbedding",
    "get_act_and_mul",
    "get_rope",
]
