"""An example third-party accel-models backend.

It implements two ops (``rms_norm`` and ``silu_and_mul``) in its own way and leaves every other op to the
reference backend. A real backend would call its device's kernels here; this one uses torch on the CPU so
that it runs anywhere, which is what makes it a good template.
"""

from __future__ import annotations

import importlib.metadata

import torch

from accel_models import BackendInfo, hookimpl

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@hookimpl
def accel_backend_info() -> BackendInfo:
    # A real backend checks here that its runtime imports and a device is present, and if not returns
    # available=False with a reason that says what to install. Never raise from this hook.
    try:
        version = importlib.metadata.version("accel-backend-example")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return BackendInfo(name="example", device_type="cpu", available=True, reason=None, priority=-10, version=version)


@hookimpl
def accel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"x has dtype {x.dtype}; the example backend supports float32, float16, bfloat16")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({x.shape[-1]},)")
    # One pass over float32 values: x / sqrt(mean(x^2) + eps), cast back, then scale (the contract's order).
    xf = x.float()
    inv_rms = torch.rsqrt(torch.einsum("...i,...i->...", xf, xf).unsqueeze(-1) / x.shape[-1] + eps)
    return (xf * inv_rms).to(x.dtype) * weight


@hookimpl
def accel_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"x has dtype {x.dtype}; the example backend supports float32, float16, bfloat16")
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must be even ([..., 2 * d]), got {x.shape[-1]}")
    gate, up = x.float().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(x.dtype)
