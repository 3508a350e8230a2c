"""Helpers shared by the model families: prefixes, layer stacks, and checkpoint loading bookkeeping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from accel_models.errors import CheckpointError
from accel_models.layers.utils import default_weight_loader, mark_loaded, missing_shards


def maybe_prefix(prefix: str, name: str) -> str:
    """``f"{prefix}.{name}"``, or ``name`` at the root (so a module's prefix is its named_modules() path)."""
    return f"{prefix}.{name}" if prefix else name


def extract_layer_index(prefix: str) -> int:
    """The decoder-layer index in a module prefix such as ``"model.layers.3.self_attn"`` (exactly one integer part)."""
    indices = [int(part) for part in prefix.split(".") if part.isdigit()]
    if len(indices) != 1:
        raise ValueError(f"prefix {prefix!r} must contain exactly one integer component (the layer index)")
    return indices[0]


def make_layers(num_layers: int, layer_fn: Callable[[str], nn.Module], prefix: str) -> nn.ModuleList:
    """``nn.ModuleList`` of ``layer_fn(prefix=f"{prefix}.{i}")`` for each layer ``i``."""
    return nn.ModuleList(layer_fn(f"{prefix}.{i}") for i in range(num_layers))


def as_model_config(config: Any) -> Any:
    """A validated :class:`accel_models.config.ModelConfig`; a transformers config or dict is converted."""
    from accel_models.config import ModelConfig, load_config

    return config if isinstance(config, ModelConfig) else load_config(config)


class WeightLoadReport:
    """Collects what a ``load_weights`` call could not do, to raise them all at once.

    A model calls :meth:`load` per checkpoint tensor (or :meth:`unexpected`), then :meth:`finish`, which
    raises :class:`CheckpointError` listing every unexpected tensor, every shape mismatch and every
    parameter (or shard of one) the checkpoint did not provide.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.loaded: set[str] = set()
        self.unexpected_names: list[str] = []
        self.errors: list[str] = []

    def param(self, name: str) -> nn.Parameter | None:
        return self.params.get(name)

    def load(self, ckpt_name: str, param_name: str, tensor: torch.Tensor, *args: Any) -> bool:
        """Load ``tensor`` into ``param_name`` through its weight_loader (``args``: shard id, expert id)."""
        param = self.params.get(param_name)
        if param is None:
            self.unexpected(ckpt_name)
            return False
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, *args)
        except ValueError as exc:
            self.errors.append(f"{ckpt_name}: {exc}")
            return False
        self.loaded.add(param_name)
        return True

    def unexpected(self, ckpt_name: str) -> None:
        self.unexpected_names.append(ckpt_name)

    def finish(self) -> set[str]:
        missing = []
        for name, param in self.params.items():
            gaps = missing_shards(param)
            if not gaps:
                continue
            if gaps == getattr(param, "expected_shards", {None}):
                missing.append(name)
            else:
                missing.append(f"{name} (shards {_fmt_shards(gaps)})")
        parts = []
        if self.unexpected_names:
            parts.append(f"{len(self.unexpected_names)} unexpected tensor(s) no parameter takes: "
                         + ", ".join(self.unexpected_names))
        if self.errors:
            parts.append(f"{len(self.errors)} tensor(s) of the wrong shape:\n  " + "\n  ".join(self.errors))
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing from the checkpoint: " + ", ".join(missing))
        if parts:
            raise CheckpointError(
                f"the checkpoint does not fit {type(self.model).__name__}:\n- " + "\n- ".join(parts)
                + "\nCheck that config.json belongs to these weights (sizes, number of layers and experts, "
                "tie_word_embeddings)."
            )
        return set(self.loaded)


def _fmt_shards(shards: set[Any]) -> str:
    items = sorted(shards, key=repr)
    text = ", ".join(map(str, items[:8]))
    return text + (f", ... {len(items) - 8} more" if len(items) > 8 else "")


def reset_loaded_shards(model: nn.Module) -> None:
    """Forget which shards were loaded (before a fresh ``load_weights``)."""
    for param in model.parameters():
        if hasattr(param, "loaded_shards"):
            param.loaded_shards = set()


__all__ = [
    "WeightLoadReport",
    "as_model_config",
    "extract_layer_index",
    "make_layers",
    "mark_loaded",
    "maybe_prefix",
    "reset_loaded_shards",
]
