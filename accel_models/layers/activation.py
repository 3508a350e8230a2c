"""Gated activations (ops ``silu_and_mul`` / ``gelu_and_mul``).

Each module's ``activation`` attribute is its name for the fused op ``act_and_mul_linear`` (``"silu"``,
``"gelu"``, ``"gelu_tanh"``): a feed-forward block passes it to
:meth:`~accel_models.layers.linear.RowParallelLinear.forward_act_and_mul` so the activation and the down
projection are one op call.
"""

from __future__ import annotations

import torch
from torch import nn

from accel_models.context import get_build_context


class SiluAndMul(nn.Module):
    """``x = [gate | up]`` of ``[..., 2 d]`` -> ``silu(gate) * up`` of ``[..., d]`` (SwiGLU)."""

    #: the activation's name for act_and_mul_linear
    activation = "silu"

    def __init__(self, *, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self._op = get_build_context().ops.silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x=x)


class GeluAndMul(nn.Module):
    """``x = [gate | up]`` -> ``gelu(gate, approximate) * up``."""

    def __init__(self, approximate: str = "none", *, prefix: str = "") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.prefix = prefix
        self.approximate = approximate
        #: the activation's name for act_and_mul_linear
        self.activation = "gelu" if approximate == "none" else "gelu_tanh"
        self._op = get_build_context().ops.gelu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x=x, approximate=self.approximate)


def get_act_and_mul(hidden_act: str, *, prefix: str = "") -> nn.Module:
    """The gated activation module for a Hugging Face ``hidden_act`` name."""
    if hidden_act == "silu":
        return SiluAndMul(prefix=prefix)
    if hidden_act in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return GeluAndMul("none" if hidden_act == "gelu" else "tanh", prefix=prefix)
    raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: silu, gelu, gelu_new, gelu_pytorch_tanh")
