"""Small helpers shared by the layers: parameter creation from the build context, weight-loader plumbing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from accel_models.context import BuildContext


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """``numerator // denominator``, refusing a remainder (a size that does not shard evenly)."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def param_dtype(ctx: BuildContext) -> torch.dtype:
    return ctx.params_dtype if ctx.params_dtype is not None else torch.get_default_dtype()


def new_param(ctx: BuildContext, *shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    """An uninitialised parameter of the build context's dtype and device (checkpoints fill it)."""
    data = torch.empty(*shape, dtype=dtype or param_dtype(ctx), device=ctx.device)
    return nn.Parameter(data, requires_grad=False)


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str = "") -> None:
    """Copy ``src`` into ``dst`` (with dtype conversion), raising ValueError on a shape mismatch.

    ``src`` may be a lazy checkpoint tensor (``accel_models.loader.LazyTensor``): it is read here, whole.
    """
    if not isinstance(src, torch.Tensor) and hasattr(src, "materialize"):
        src = src.materialize()
    if tuple(dst.shape) != tuple(src.shape):
        where = f" ({what})" if what else ""
        raise ValueError(
            f"shape mismatch{where}: checkpoint tensor has shape {tuple(src.shape)}, the parameter slice expects "
            f"{tuple(dst.shape)}"
        )
    dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """Copy a whole (unsharded) tensor into ``param``."""
    if shard_id is not None:
        raise ValueError(f"this parameter takes no shard id (got {shard_id!r})")
    copy_checked(param.data, loaded_weight)
    mark_loaded(param, None)


# Every parameter records which shards the checkpoint has filled (``param.loaded_shards``) against the
# shards it needs (``param.expected_shards``), so a model can name what a checkpoint left out.


def expect_shards(param: torch.Tensor, shards: set[Any] | None = None) -> None:
    param.expected_shards = set(shards) if shards else {None}  # type: ignore[attr-defined]
    param.loaded_shards = set()  # type: ignore[attr-defined]


def mark_loaded(param: torch.Tensor, shard: Any) -> None:
    if not hasattr(param, "loaded_shards"):
        expect_shards(param)
    if shard is None:
        param.loaded_shards.update(param.expected_shards)  # type: ignore[attr-defined]
    else:
        param.loaded_shards.add(shard)  # type: ignore[attr-defined]


def missing_shards(param: torch.Tensor) -> set[Any]:
    """The shards of ``param`` no checkpoint tensor has filled yet."""
    if not hasattr(param, "expected_shards"):
        expect_shards(param)
    return set(param.expected_shards) - set(param.loaded_shards)  # type: ignore[attr-defined]
