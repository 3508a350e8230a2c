"""The standalone runtime: paged KV cache, continuous batching, sampling and the ``LLM`` API.

``LLM`` loads lazily (``from accel_models.runtime import LLM``) so importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LLM": "accel_models.runtime.llm",
    "SamplingParams": "accel_models.runtime.sampling_params",
    "RequestOutput": "accel_models.runtime.outputs",
    "CompletionOutput": "accel_models.runtime.outputs",
    "Logprob": "accel_models.runtime.outputs",
    "Tokenizer": "accel_models.runtime.tokenizer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'accel_models.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
