"""accel-models: an LLM model zoo written once, run on any accelerator through backend plugins."""

from __future__ import annotations

import importlib
from typing import Any

from accel_models.backends import (
    BackendError,
    OpTable,
    get_backend,
    list_backends,
    register_backend,
    resolve_ops,
    unregister_backend,
    use_backend,
)
from accel_models.hookspecs import hookimpl
from accel_models.types import HOOKSPEC_API_VERSION, BackendInfo, KVCacheLayout

__version__ = "0.1.0"

# Heavier parts load on first use, so `import accel_models` stays cheap for backend packages.
_LAZY = {
    "load_model": "accel_models.loader",
    "load_config": "accel_models.config",
    "load_generation_config": "accel_models.loader",
    "ConfigError": "accel_models.errors",
    "CheckpointError": "accel_models.errors",
    "UnsupportedModelError": "accel_models.errors",
    "ModelRunner": "accel_models.runner",
    "TPModelRunner": "accel_models.distributed",
    "LLM": "accel_models.runtime.llm",
    "SamplingParams": "accel_models.runtime.sampling_params",
    "RequestOutput": "accel_models.runtime.outputs",
    "CompletionOutput": "accel_models.runtime.outputs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'accel_models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "HOOKSPEC_API_VERSION",
    "BackendError",
    "BackendInfo",
    "CheckpointError",
    "ConfigError",
    "UnsupportedModelError",
    "load_config",
    "load_generation_config",
    "CompletionOutput",
    "KVCacheLayout",
    "LLM",
    "ModelRunner",
    "OpTable",
    "RequestOutput",
    "SamplingParams",
    "TPModelRunner",
    "get_backend",
    "hookimpl",
    "list_backends",
    "load_model",
    "register_backend",
    "resolve_ops",
    "unregister_backend",
    "use_backend",
]
