"""RMSNorm, optionally fused with the residual add (ops ``rms_norm`` / ``fused_add_rms_norm``)."""

from __future__ import annotations

import torch
from torch import nn

from accel_models.context import get_build_context
from accel_models.layers.utils import default_weight_loader, expect_shards, new_param, set_weight_attrs


class RMSNorm(nn.Module):
    """``forward(x)`` -> ``rms_norm(x)``; ``forward(x, residual)`` -> ``(rms_norm(x + residual), x + residual)``.

    The math is Hugging Face Llama's: normalize in float32, cast back to ``x``'s dtype, then scale.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, prefix: str = "") -> None:
        super().__init__()
        ctx = get_build_context()
        self.prefix = prefix
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self._rms_norm = ctx.ops.rms_norm
        self._fused_add_rms_norm = ctx.ops.fused_add_rms_norm
        self.weight = new_param(ctx, hidden_size)
        self.weight.data.fill_(1.0)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})
        expect_shards(self.weight)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._rms_norm(x=x, weight=self.weight, eps=self.variance_epsilon)
        return self._fused_add_rms_norm(x=x, residual=residual, weight=self.weight, eps=self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"
