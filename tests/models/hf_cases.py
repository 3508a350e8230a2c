"""Tiny random Hugging Face models saved as real checkpoints, and the transformers reference forward.

Shared by the model tests. transformers is a test dependency: these helpers are used only after
``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, intermediate_size=37, tie_word_embeddings=False)


@dataclass(frozen=True)
class Case:
    name: str
    config_cls: str  # transformers class name
    overrides: dict[str, Any] = field(default_factory=dict)
    moe: bool = False

    def hf_config(self) -> Any:
        import transformers

        return getattr(transformers, self.config_cls)(**{**BASE, **self.overrides})


CASES = [
    Case("llama-gqa-hd32-default", "LlamaConfig", dict(head_dim=32)),
    Case("llama-mha-hd64-tied-linear", "LlamaConfig",
         dict(num_attention_heads=2, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
              rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    Case("llama-mqa-dynamic", "LlamaConfig",
         dict(num_key_value_heads=1, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    Case("llama-hd64-llama3", "LlamaConfig",
         dict(num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=51,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    Case("llama-hd32-yarn", "LlamaConfig",
         dict(head_dim=32, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 16})),
    Case("llama-hd32-longrope", "LlamaConfig",
         dict(head_dim=32, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                            "short_factor": [1.0 + 0.1 * i for i in range(16)],
                                            "long_factor": [2.0 + 0.5 * i for i in range(16)],
                                            "original_max_position_embeddings": 16})),
    Case("mistral-sliding4", "MistralConfig", dict(head_dim=32, sliding_window=4)),
    Case("qwen2-sliding-tied", "Qwen2Config",
         dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, tie_word_embeddings=True)),
    Case("qwen3-hd64", "Qwen3Config", dict(head_dim=64)),
    Case("qwen3-hd32-tied-mha", "Qwen3Config",
         dict(head_dim=32, num_key_value_heads=4, tie_word_embeddings=True)),
    Case("mixtral-8x2", "MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2), moe=True),
    Case("qwen2moe-60x4-shared", "Qwen2MoeConfig",
         dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=24, shared_expert_intermediate_size=40,
              mlp_only_layers=[1]), moe=True),
    Case("qwen2moe-8x2-step2-norm", "Qwen2MoeConfig",
         dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=19, shared_expert_intermediate_size=21,
              decoder_sparse_step=2, norm_topk_prob=True), moe=True),
    Case("qwen3moe-8x2", "Qwen3MoeConfig",
         dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True, head_dim=32),
         moe=True),
]
CASES_BY_NAME = {c.name: c for c in CASES}

#: token sequences run together in one mixed batch (12 > the sliding windows, within the rope lengths)
SEQUENCES = [[3, 17, 42, 5, 99, 127, 0, 64, 8, 31, 77, 12], [9, 8, 7, 6, 5], [100]]


def build_hf(case: Case) -> Any:
    """The transformers model of ``case`` with random weights of a useful scale, in float32 eval mode."""
    import transformers

    torch.manual_seed(sum(map(ord, case.name)))
    kwargs = {"experts_implementation": "eager"} if case.moe else {}
    model = transformers.AutoModelForCausalLM.from_config(case.hf_config(), **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)  # routers and shared-expert gates are zero at init otherwise
    return model


@functools.lru_cache(maxsize=None)
def _checkpoint(case_name: str, root: str) -> tuple[str, Any]:
    case = CASES_BY_NAME[case_name]
    model = build_hf(case)
    path = Path(root) / case.name
    model.save_pretrained(path, safe_serialization=True)
    return str(path), model


def checkpoint(case: Case, root: Path) -> tuple[str, Any]:
    """(checkpoint dir, the HF model) for ``case``, saved once per test session under ``root``."""
    return _checkpoint(case.name, str(root))


def hf_logits(model: Any, sequences: list[list[int]]) -> list[torch.Tensor]:
    """transformers' logits ``[len, vocab]`` of each sequence (run one at a time: no padding involved)."""
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0] for s in sequences]


def widen_hf_to_float64(model: Any) -> Any:
    """Remove transformers' deliberate float32 islands so a float64 run is float64 throughout.

    Its RMSNorm upcasts to float32 and casts back; its MoE routers take the softmax in float32. Both are
    replaced by the same math in the input's dtype. Returns the model, converted to float64.
    """

    def rms_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def router_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        probs = torch.softmax(logits, dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalizes
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top, idx

    for module in model.modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_forward, module)
        elif cls.endswith("TopKRouter"):
            module.forward = types.MethodType(router_forward, module)
    return model.to(torch.float64)
