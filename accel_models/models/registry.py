"""Hugging Face architecture name -> zoo model class."""

from __future__ import annotations

import importlib

from torch import nn

from accel_models.errors import UnsupportedModelError

#: architecture name -> (module under accel_models.models, class name). Modules import on first use.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek_v2", "DeepseekV3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    """The Hugging Face architecture names the zoo implements, sorted."""
    return sorted(_MODELS)


def get_model_class(arch: str) -> type[nn.Module]:
    """The zoo class for an HF architecture name (``config.architectures[0]``)."""
    entry = _MODELS.get(arch)
    if entry is None:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported by accel-models; supported: {', '.join(supported_architectures())}"
        )
    module, name = entry
    return getattr(importlib.import_module(f"accel_models.models.{module}"), name)
