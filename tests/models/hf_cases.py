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
#: MLA (every head its own key/value: num_key_value_heads = heads), query/key heads of 16 + 8 channels
_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
CASES += [
    # DeepSeek-V2-Lite's shape: no q low-rank, greedy softmax routing, 2 shared experts, a dense first layer,
    # yarn with mscale_all_dim (the softmax scale changes)
    Case("deepseekv2-lite-yarn", "DeepseekV2Config",
         dict(_MLA, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
              n_shared_experts=2, first_k_dense_replace=1, topk_method="greedy",
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 0.707,
                               "beta_fast": 32, "beta_slow": 1}), moe=True),
    # DeepSeek-V2's: q low-rank, group-limited routing, scaled weights, value heads narrower than the rest;
    # the expanded cache (accel-models' mla_cache key; the other two cases take the latent one)
    Case("deepseekv2-qlora-grouped", "DeepseekV2Config",
         dict(_MLA, mla_cache="expanded", q_lora_rank=24, v_head_dim=12, n_routed_experts=16, num_experts_per_tok=3,
              moe_intermediate_size=20, n_shared_experts=1, topk_method="group_limited_greedy", n_group=4,
              topk_group=2, routed_scaling_factor=2.0, tie_word_embeddings=True), moe=True),
    # DeepSeek-V3's: sigmoid routing with the correction bias over expert groups, renormalized and scaled
    Case("deepseekv3-noaux-yarn", "DeepseekV3Config",
         dict(_MLA, q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=20,
              n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0,
                               "beta_fast": 32, "beta_slow": 1}), moe=True),
    # rope_interleave false (rotary halves) and value heads wider than query/key heads (those are padded in
    # the expanded cache)
    Case("deepseekv3-halves-wide-v", "DeepseekV3Config",
         dict(_MLA, mla_cache="expanded", q_lora_rank=None, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
              moe_intermediate_size=20, n_shared_experts=2, n_group=2, topk_group=1, first_k_dense_replace=0,
              rope_interleave=False), moe=True),
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
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: zero at init, a buffer
                b.normal_(0.0, 0.3)
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


def _widen_deepseek_v2_rotary() -> None:
    """transformers' DeepSeek-V2 rotary casts q and k to float32 (complex64) and back; in float64 it must not.

    The replacement is the same computation in float32 for float32 and 16-bit inputs (so patching the module
    for the whole session changes nothing for the other tests) and in float64 for float64 inputs.
    """
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    if getattr(m.apply_rotary_emb, "widened", False):
        return

    def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, ...]:
        wide = torch.float64 if xq.dtype == torch.float64 else torch.float32
        xq_ = torch.view_as_complex(xq.to(wide).reshape(*xq.shape[:-1], -1, 2))
        xk_ = torch.view_as_complex(xk.to(wide).reshape(*xk.shape[:-1], -1, 2))
        freqs_cis = freqs_cis.unsqueeze(1).to(xq_.device)
        return (torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq),
                torch.view_as_real(xk_ * freqs_cis).flatten(3).type_as(xk))

    @torch.no_grad()
    def rotary_forward(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # torch.polar's float32 cos/sin differ from torch.cos/torch.sin's by an ulp here and there: the zoo's
        # cache (float32, as transformers computes it for every other family) uses the latter
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.complex(freqs.cos(), freqs.sin()) * self.attention_scaling

    apply_rotary_emb.widened = True  # type: ignore[attr-defined]
    m.apply_rotary_emb = apply_rotary_emb
    m.DeepseekV2RotaryEmbedding.forward = rotary_forward


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

    def deepseek_router_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # transformers' DeepSeek-V2/V3 routers (their float32 casts removed; the same steps otherwise)
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        v3 = hasattr(self, "e_score_correction_bias")
        scores = logits.sigmoid() if v3 else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if v3 else scores
        if v3 or self.topk_method == "group_limited_greedy":
            grouped = choice.view(-1, self.num_group, self.num_experts // self.num_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if v3 else grouped.max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            mask = mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)
            choice = choice.masked_fill(~mask.bool(), float("-inf") if v3 else 0.0)
        idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        top = scores.gather(1, idx)
        if v3 and self.norm_topk_prob:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, top * self.routed_scaling_factor, idx

    _widen_deepseek_v2_rotary()
    for module in model.modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_forward, module)
        elif cls.endswith("TopKRouter"):
            module.forward = types.MethodType(router_forward, module)
        elif cls in ("DeepseekV2TopkRouter", "DeepseekV3TopkRouter"):
            module.forward = types.MethodType(deepseek_router_forward, module)
    return model.to(torch.float64)
