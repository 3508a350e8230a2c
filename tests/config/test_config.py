"""accel_models.config: both config.json formats, normalization, and errors that name the problem.

Expected values are computed by hand in the tests, or taken from transformers (an independent
implementation) reading the same config.json.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accel_models.config import (
    CONFIG_CLASSES,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    load_config,
)
from accel_models.errors import ConfigError, UnsupportedModelError

SUPPORTED = sorted(CONFIG_CLASSES)


def write(tmp_path: Path, data: dict | str, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


# ----------------------------------------------------------------------------------------------------
# Hand-written configs, transformers 4.x style (as most published checkpoints) and 5.x style
# ----------------------------------------------------------------------------------------------------

LLAMA31_4X = {  # Llama-3.1-8B, shrunk
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 256, "intermediate_size": 688, "max_position_embeddings": 131072, "mlp_bias": False,
    "num_attention_heads": 8, "num_hidden_layers": 2, "num_key_value_heads": 2, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 1000,
}
LLAMA_5X = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 96, "intermediate_size": 200,
    "num_attention_heads": 3, "num_key_value_heads": None, "head_dim": None, "num_hidden_layers": 2,
    "vocab_size": 500, "dtype": "float32", "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "tie_word_embeddings": True, "sliding_window": 7, "layer_types": None, "transformers_version": "5.19.0",
}
MISTRAL_4X = {  # Mistral-7B-v0.1, shrunk: sliding window on every layer
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 128, "intermediate_size": 448, "max_position_embeddings": 32768,
    "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 1000,
}
MISTRAL_5X = {  # v0.2+: explicit null window, head_dim given
    "architectures": ["MistralForCausalLM"], "hidden_size": 128, "intermediate_size": 448, "num_attention_heads": 8,
    "num_hidden_layers": 2, "head_dim": 64, "vocab_size": 1000, "sliding_window": None, "dtype": "float16",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}
QWEN2_4X = {  # Qwen2.5-7B-Instruct, shrunk: window given but not in use
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 112, "initializer_range": 0.02, "intermediate_size": 300,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 7,
    "num_hidden_layers": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 1000, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}
QWEN2_5X_SLIDING = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 100, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 5, "vocab_size": 100, "use_sliding_window": True,
    "sliding_window": 16, "max_window_layers": 3, "layer_types": None, "dtype": None,
    "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
}
QWEN3_4X = {  # Qwen3-0.6B, shrunk: explicit head_dim larger than hidden/heads, tied embeddings
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 128, "intermediate_size": 384,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 1000,
}
QWEN3_5X_NO_HEAD_DIM = {
    "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 100, "num_attention_heads": 4,
    "num_hidden_layers": 2, "vocab_size": 100, "attention_bias": True, "num_key_value_heads": None,
    "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 64,
                        "long_factor": [2.0] * 64, "original_max_position_embeddings": 4096},
    "max_position_embeddings": 16384,
}
MIXTRAL_4X = {  # Mixtral-8x7B, shrunk
    "architectures": ["MixtralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 128, "intermediate_size": 224, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "num_local_experts": 8, "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 1000,
}
MIXTRAL_5X = {
    "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
    "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 100, "num_experts": 4, "num_experts_per_tok": 2,
    "head_dim": None, "sliding_window": 32, "dtype": "bfloat16", "rope_parameters": None,
}
QWEN2MOE_4X = {  # Qwen1.5-MoE-A2.7B, shrunk
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 64,
    "intermediate_size": 176, "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
    "moe_intermediate_size": 44, "norm_topk_prob": False, "num_attention_heads": 4, "num_experts": 60,
    "num_experts_per_tok": 4, "num_hidden_layers": 3, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "shared_expert_intermediate_size": 176, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 1000,
}
QWEN2MOE_5X = {
    "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 100, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 100, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2,
    "mlp_only_layers": [3], "qkv_bias": False, "use_sliding_window": True, "sliding_window": 8,
    "max_window_layers": 3, "norm_topk_prob": True, "dtype": "float32",
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
QWEN3MOE_4X = {  # Qwen3-30B-A3B, shrunk
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 32, "hidden_act": "silu", "hidden_size": 64,
    "intermediate_size": 192, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
    "model_type": "qwen3_moe", "moe_intermediate_size": 24, "norm_topk_prob": True, "num_attention_heads": 4,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 1000,
}
QWEN3MOE_5X = {  # what transformers 5 writes: num_local_experts, no head_dim
    "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 100, "num_attention_heads": 4,
    "num_hidden_layers": 3, "vocab_size": 100, "num_local_experts": 6, "num_experts_per_tok": 3,
    "moe_intermediate_size": 16, "mlp_only_layers": [1], "use_sliding_window": True, "sliding_window": 64,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}, "dtype": "float16",
}

FULL, SLIDE = "full_attention", "sliding_attention"

# (config, expected class, expected normalized values computed by hand)
CASES = {
    "llama-4x": (LLAMA31_4X, LlamaConfig, dict(
        head_dim=32, num_key_value_heads=2, dtype="bfloat16", sliding_window=None, layer_types=[FULL, FULL],
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        eos_token_id=[128001, 128008, 128009], rms_norm_eps=1e-5, qkv_proj_bias=False, o_proj_bias=False,
        pretraining_tp=1)),
    "llama-5x": (LLAMA_5X, LlamaConfig, dict(
        head_dim=32, num_key_value_heads=3, dtype="float32", sliding_window=None, layer_types=[FULL, FULL],
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, tie_word_embeddings=True,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)),
    "mistral-4x": (MISTRAL_4X, MistralConfig, dict(
        head_dim=32, num_key_value_heads=2, sliding_window=4096, layer_types=[SLIDE] * 3,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "mistral-5x": (MISTRAL_5X, MistralConfig, dict(
        head_dim=64, num_key_value_heads=8, sliding_window=None, layer_types=[FULL, FULL],
        dtype="float16", max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-4x": (QWEN2_4X, Qwen2Config, dict(
        head_dim=16, num_key_value_heads=1, sliding_window=None, layer_types=[FULL] * 4, qkv_proj_bias=True,
        o_proj_bias=False, eos_token_id=151645,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
                         "attention_factor": 0.1 * math.log(4.0) + 1.0})),
    "qwen2-5x-sliding": (QWEN2_5X_SLIDING, Qwen2Config, dict(
        head_dim=16, sliding_window=16, layer_types=[FULL, FULL, FULL, SLIDE, SLIDE], dtype=None,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen3-4x": (QWEN3_4X, Qwen3Config, dict(
        head_dim=128, num_key_value_heads=2, tie_word_embeddings=True, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, qkv_proj_bias=False, o_proj_bias=False)),
    "qwen3-5x": (QWEN3_5X_NO_HEAD_DIM, Qwen3Config, dict(
        head_dim=128, num_key_value_heads=4, qkv_proj_bias=True, o_proj_bias=True,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 64,
                         "long_factor": [2.0] * 64, "original_max_position_embeddings": 4096, "factor": 4.0,
                         "attention_factor": math.sqrt(1 + math.log(4.0) / math.log(4096))})),
    "mixtral-4x": (MIXTRAL_4X, MixtralConfig, dict(
        head_dim=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=None, layer_types=[FULL, FULL],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, moe_layers=[True, True])),
    "mixtral-5x": (MIXTRAL_5X, MixtralConfig, dict(
        head_dim=16, num_local_experts=4, sliding_window=32, layer_types=[SLIDE, SLIDE], rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, dtype="bfloat16")),
    "qwen2moe-4x": (QWEN2MOE_4X, Qwen2MoeConfig, dict(
        head_dim=16, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=44,
        shared_expert_intermediate_size=176, sliding_window=None, layer_types=[FULL] * 3, qkv_proj_bias=True,
        o_proj_bias=False, moe_layers=[True] * 3, norm_topk_prob=False, mlp_only_layers=[])),
    "qwen2moe-5x": (QWEN2MOE_5X, Qwen2MoeConfig, dict(
        sliding_window=8, layer_types=[SLIDE, FULL, SLIDE, FULL],  # even layers below max_window_layers=3
        moe_layers=[False, True, False, False], qkv_proj_bias=False, norm_topk_prob=True)),
    "qwen3moe-4x": (QWEN3MOE_4X, Qwen3MoeConfig, dict(
        head_dim=32, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=24, norm_topk_prob=True,
        sliding_window=None, moe_layers=[True, True], rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3moe-5x": (QWEN3MOE_5X, Qwen3MoeConfig, dict(
        head_dim=16, num_key_value_heads=4, num_experts=6, sliding_window=64, layer_types=[SLIDE] * 3,
        moe_layers=[True, False, True], dtype="float16")),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("via", ["dir", "file", "dict"])
def test_hand_written_configs_normalize(case, via, tmp_path):
    data, cls, expected = CASES[case]
    source = {"dir": tmp_path, "file": write(tmp_path, data), "dict": data}[via]
    if via == "dir":
        write(tmp_path, data)
    cfg = load_config(source)
    assert type(cfg) is cls
    assert cfg.architecture == data["architectures"][0]
    for key, want in expected.items():
        if key == "moe_layers":
            got = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
        else:
            got = getattr(cfg, key)
        if key == "rope_parameters":
            assert set(got) == set(want), key
            for k in want:
                assert got[k] == (pytest.approx(want[k], rel=1e-12) if isinstance(want[k], float) else want[k]), k
        else:
            assert got == want, key
    assert isinstance(cfg.head_dim, int) and isinstance(cfg.num_key_value_heads, int)
    assert "rope_theta" not in cfg.model_extra and "rope_scaling" not in cfg.model_extra
    assert "torch_dtype" not in cfg.model_extra
    for i in range(cfg.num_hidden_layers):
        want = cfg.sliding_window if cfg.layer_types[i] == SLIDE else None
        assert cfg.sliding_window_for_layer(i) == want


def test_unknown_keys_are_kept_and_config_is_frozen():
    cfg = load_config({**LLAMA31_4X, "my_custom_flag": [1, 2]})
    assert cfg.my_custom_flag == [1, 2]
    assert cfg.to_dict()["my_custom_flag"] == [1, 2]
    with pytest.raises(Exception):
        cfg.hidden_size = 3
    bigger = cfg.replace(num_hidden_layers=4)
    assert bigger.num_hidden_layers == 4 and len(bigger.layer_types) == 4 and cfg.num_hidden_layers == 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_normalized_dict_reloads_to_the_same_config(case):
    cfg = load_config(CASES[case][0])
    again = load_config(cfg.to_dict())
    assert again == cfg


def test_get_torch_dtype_and_eos_list():
    import torch

    cfg = load_config(LLAMA31_4X)
    assert cfg.get_torch_dtype() is torch.bfloat16
    assert cfg.eos_token_ids == [128001, 128008, 128009]
    assert load_config(QWEN2_5X_SLIDING).get_torch_dtype() is None
    assert load_config(QWEN2_5X_SLIDING).eos_token_ids == []


def test_rope_scaling_variants():
    base = {k: v for k, v in LLAMA31_4X.items() if k not in ("rope_scaling",)}
    # 4.x "type" key, top-level original_max_position_embeddings wins (as in transformers), yarn with mscale
    cfg = load_config({**base, "original_max_position_embeddings": 4096,
                       "rope_scaling": {"type": "yarn", "factor": 16.0, "mscale": 0.707, "mscale_all_dim": 0.707}})
    rp = cfg.rope_parameters
    assert rp["original_max_position_embeddings"] == 4096 and rp["attention_factor"] == pytest.approx(1.0)
    # yarn with null factor: max_position_embeddings / original
    cfg = load_config({**base, "max_position_embeddings": 8192,
                       "rope_scaling": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 2048}})
    assert cfg.rope_parameters["factor"] == 4.0
    assert cfg.rope_parameters["attention_factor"] == pytest.approx(0.1 * math.log(4) + 1)
    # partial rotary factor given at top level lands in rope_parameters
    cfg = load_config({**base, "partial_rotary_factor": 0.5, "rope_scaling": None})
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5}
    assert cfg.rotary_dim == 16
    # no rope information at all: the family's default theta
    assert load_config(base).rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    nothing = {k: v for k, v in base.items() if k != "rope_theta"}
    assert load_config(nothing).rope_parameters["rope_theta"] == 10000.0
    assert load_config({**MIXTRAL_4X, "rope_theta": None}).rope_parameters["rope_theta"] == 1e6


# ----------------------------------------------------------------------------------------------------
# Against transformers: the same config.json read by transformers 5.19
# ----------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")


def hf_view(hf_cfg) -> dict:
    """What transformers' modeling code uses, read the way its modeling files read it."""
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    n = hf_cfg.num_hidden_layers
    arch = type(hf_cfg).__name__
    if arch in ("Qwen2Config", "Qwen3Config", "Qwen2MoeConfig"):
        windows = [hf_cfg.sliding_window if hf_cfg.layer_types[i] == SLIDE else None for i in range(n)]
    elif arch == "LlamaConfig":
        windows = [None] * n
    else:  # Mistral, Mixtral, Qwen3-MoE: every layer uses config.sliding_window
        windows = [getattr(hf_cfg, "sliding_window", None)] * n
    windows = [w or None for w in windows]  # Qwen2-MoE stores 0 for "no window"
    rp = dict(hf_cfg.rope_parameters)
    rp.pop("type", None)
    kv_heads = hf_cfg.num_key_value_heads
    if arch in ("DeepseekV2Config", "DeepseekV3Config"):
        kv_heads = hf_cfg.num_attention_heads  # MLA: kv_b_proj expands a key and a value for every head
    return {"head_dim": head_dim, "num_key_value_heads": kv_heads, "windows": windows,
            "rope_parameters": rp, "dtype": str(hf_cfg.dtype).removeprefix("torch.") if hf_cfg.dtype else None}


def hf_config(data: dict):
    arch = data["architectures"][0]
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return cls.from_dict(dict(data))


def assert_matches_hf(cfg, hf_cfg) -> None:
    view = hf_view(hf_cfg)
    assert cfg.head_dim == view["head_dim"]
    assert cfg.num_key_value_heads == view["num_key_value_heads"]
    assert [cfg.sliding_window_for_layer(i) for i in range(cfg.num_hidden_layers)] == view["windows"]
    assert cfg.dtype == view["dtype"]
    for key, value in view["rope_parameters"].items():  # transformers' keys all present with its values
        assert cfg.rope_parameters[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type in ("yarn", "longrope"):  # the attention factor transformers derives when computing frequencies
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        _, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg)
        assert cfg.rope_parameters["attention_factor"] == pytest.approx(attention_factor, rel=1e-12)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "hidden_act", "bos_token_id",
                "eos_token_id", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "num_local_experts", "num_experts",
                "n_routed_experts", "n_shared_experts", "n_group", "topk_group", "routed_scaling_factor",
                "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "rope_interleave", "num_nextn_predict_layers"):
        if hasattr(hf_cfg, key) and hasattr(cfg, key):
            assert getattr(cfg, key) == getattr(hf_cfg, key), key
    if hasattr(hf_cfg, "mlp_only_layers"):  # the sparse-layer rule of transformers' decoder layer
        want = [(i not in hf_cfg.mlp_only_layers) and hf_cfg.num_experts > 0 and (i + 1) % hf_cfg.decoder_sparse_step == 0
                for i in range(hf_cfg.num_hidden_layers)]
        assert [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)] == want
    if hasattr(hf_cfg, "first_k_dense_replace"):  # DeepSeek's decoder layer: MoE from first_k_dense_replace on
        want = [i >= hf_cfg.first_k_dense_replace for i in range(hf_cfg.num_hidden_layers)]
        assert [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)] == want


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_written_configs_agree_with_transformers(case):
    data = CASES[case][0]
    assert_matches_hf(load_config(data), hf_config(data))


def _tiny_hf_configs():
    T = transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
    yield "llama-gqa-llama3", T.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True,
                                            max_position_embeddings=4096, rope_parameters={
                                                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 1024})
    yield "llama-mha-headdim32", T.LlamaConfig(**common, head_dim=32, attention_bias=True)
    yield "mistral-window", T.MistralConfig(**common, num_key_value_heads=1, sliding_window=8)
    yield "qwen2-yarn-sliding", T.Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                              max_window_layers=1, max_position_embeddings=8192, rope_parameters={
                                                  "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                  "original_max_position_embeddings": 2048})
    yield "qwen3-longrope", T.Qwen3Config(**common, head_dim=32, num_key_value_heads=1, max_position_embeddings=8192, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 16, "long_factor": [3.0] * 16,
        "original_max_position_embeddings": 2048})
    yield "mixtral", T.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    yield "qwen2moe", T.Qwen2MoeConfig(**common, num_key_value_heads=2, num_experts=60, num_experts_per_tok=4,
                                       moe_intermediate_size=16, shared_expert_intermediate_size=48,
                                       use_sliding_window=True, sliding_window=8, max_window_layers=2,
                                       decoder_sparse_step=1, mlp_only_layers=[2])
    yield "qwen3moe", T.Qwen3MoeConfig(**common, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                       moe_intermediate_size=16, norm_topk_prob=True,
                                       rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})

    yield "deepseekv2-lite-yarn", T.DeepseekV2Config(
        **common, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
        first_k_dense_replace=1, max_position_embeddings=8192, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 2048,
            "mscale": 0.707, "mscale_all_dim": 0.707})
    yield "deepseekv3", T.DeepseekV3Config(
        **common, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=16, n_group=4, topk_group=2,
        first_k_dense_replace=2, rope_interleave=False)


HF_TINY = dict(_tiny_hf_configs())


@pytest.mark.parametrize("name", sorted(HF_TINY))
def test_save_pretrained_configs_round_trip(name, tmp_path):
    hf_cfg = copy.deepcopy(HF_TINY[name])
    hf_cfg.architectures = [type(hf_cfg).__name__.replace("Config", "ForCausalLM")]  # as a model's save_pretrained
    hf_cfg.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["transformers_version"] == transformers.__version__
    cfg = load_config(tmp_path)
    assert type(cfg).__name__ == type(hf_cfg).__name__
    assert_matches_hf(cfg, transformers.AutoConfig.from_pretrained(tmp_path))
    assert cfg.architecture == hf_cfg.architectures[0]


# The subtle per-layer sliding-window rules, against transformers over many shapes.
@given(
    family=st.sampled_from(["Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                            "MistralForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM"]),
    layers=st.integers(1, 9),
    use=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 64)),
    max_window_layers=st.integers(0, 10),
    step=st.integers(1, 3),
)
def test_sliding_window_and_sparse_layers_match_transformers(family, layers, use, window, max_window_layers, step):
    data = {"architectures": [family], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
            "use_sliding_window": use, "sliding_window": window, "max_window_layers": max_window_layers}
    if "Moe" in family or family.startswith("Mixtral"):
        data.update(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                    shared_expert_intermediate_size=8, decoder_sparse_step=step)
        if family.startswith("Mixtral"):
            data.pop("num_experts")
        else:
            data.pop("num_local_experts")
    assert_matches_hf(load_config(data), hf_config(data))


# ----------------------------------------------------------------------------------------------------
# Bad input: every error names the problem
# ----------------------------------------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tmp_path):
    text = '{\n  "architectures": ["LlamaForCausalLM"],\n  "hidden_size": 64,,\n}'
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "malformed" in msg


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.json")


def test_config_must_be_an_object(tmp_path):
    write(tmp_path, "[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)


def test_missing_architectures_suggests_from_model_type():
    data = {k: v for k, v in QWEN2_4X.items() if k != "architectures"}
    with pytest.raises(ConfigError) as err:
        load_config(data)
    assert "'architectures' is missing" in str(err.value) and '"Qwen2ForCausalLM"' in str(err.value)


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError) as err:
        load_config({**LLAMA31_4X, "architectures": ["GPT2LMHeadModel"]})
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg and all(a in msg for a in SUPPORTED)
    assert isinstance(err.value, ConfigError)


def test_first_supported_architecture_is_used():
    cfg = load_config({**MISTRAL_4X, "architectures": ["SomethingElse", "MistralForCausalLM"]})
    assert isinstance(cfg, MistralConfig)


BAD = {
    "missing field": ({k: v for k, v in LLAMA31_4X.items() if k != "num_hidden_layers"},
                      ["missing required field 'num_hidden_layers'"]),
    "missing moe field": ({k: v for k, v in QWEN2MOE_4X.items() if k != "shared_expert_intermediate_size"},
                          ["missing required field 'shared_expert_intermediate_size'"]),
    "wrong type": ({**LLAMA31_4X, "hidden_size": "large"}, ["'hidden_size'", "valid integer", "'large'"]),
    "non-positive": ({**LLAMA31_4X, "vocab_size": 0}, ["'vocab_size'", "greater than 0"]),
    "indivisible heads": ({**LLAMA31_4X, "num_attention_heads": 8, "num_key_value_heads": 3},
                          ["num_attention_heads (8) is not divisible by num_key_value_heads (3)"]),
    "indivisible hidden": ({**LLAMA31_4X, "hidden_size": 100, "num_key_value_heads": 8},
                           ["hidden_size (100) is not divisible by num_attention_heads (8)", "set head_dim"]),
    "unknown rope type": ({**LLAMA31_4X, "rope_scaling": {"rope_type": "ntk-magic", "factor": 2.0}},
                          ["unknown rope type 'ntk-magic'", "default, linear, dynamic, llama3, yarn, longrope"]),
    "rope missing field": ({**LLAMA31_4X, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
                           ["rope type 'llama3' needs 'high_freq_factor'"]),
    "rope bad number": ({**LLAMA31_4X, "rope_scaling": {"type": "linear", "factor": "two"}},
                        ["rope parameter 'factor' must be a number", "'two'"]),
    "rope not a dict": ({**LLAMA31_4X, "rope_scaling": [1, 2]}, ["must be an object"]),
    "longrope length": ({**QWEN3_5X_NO_HEAD_DIM, "rope_parameters": {
        **QWEN3_5X_NO_HEAD_DIM["rope_parameters"], "short_factor": [1.0] * 3}},
        ["'short_factor' has 3 entries", "needs 64"]),
    "top_k > experts": ({**QWEN2MOE_4X, "num_experts_per_tok": 61},
                        ["num_experts_per_tok (61) is larger than num_experts (60)"]),
    "top_k > local experts": ({**MIXTRAL_4X, "num_experts_per_tok": 9},
                              ["num_experts_per_tok (9) is larger than num_local_experts (8)"]),
    "alias conflict": ({**MIXTRAL_4X, "num_experts": 4}, ["num_local_experts=8 and num_experts=4 disagree"]),
    "layer_types length": ({**QWEN2_5X_SLIDING, "layer_types": [FULL, SLIDE]},
                           ["layer_types has 2 entries but num_hidden_layers is 5"]),
    "layer_types value": ({**QWEN2_5X_SLIDING, "layer_types": [FULL] * 4 + ["chunked_attention"]},
                          ["'layer_types.4'", "chunked_attention"]),
    "bad dtype": ({**LLAMA31_4X, "torch_dtype": "int4"}, ["unsupported dtype 'int4'", "float32, bfloat16"]),
    "quantized": ({**LLAMA31_4X, "quantization_config": {"quant_method": "awq", "bits": 4}},
                  ["quantized checkpoints are not supported", "'awq'"]),
    "architectures not list": ({**LLAMA31_4X, "architectures": [1]}, ["'architectures' must be a list"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_raise_config_error_naming_the_problem(case, tmp_path):
    data, fragments = BAD[case]
    write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert str(tmp_path / "config.json") in msg  # the error says which file


def test_all_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError) and issubclass(UnsupportedModelError, ConfigError)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_absent_fields_take_transformers_defaults(arch):
    """A minimal config (no kv heads, head_dim, eps, window, ids...) normalizes as transformers reads it."""
    data = {"architectures": [arch], "vocab_size": 64, "hidden_size": 256, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 32}
    if arch.startswith("Mixtral"):
        data.update(num_local_experts=4, num_experts_per_tok=2)
    elif "Moe" in arch:
        data.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8)
    elif arch.startswith("Deepseek"):  # structural sizes are required; V3's 8 default groups need >= 16 experts
        data.update(n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=8)
    cfg = load_config(data)
    assert_matches_hf(cfg, hf_config(data))


@pytest.mark.parametrize("name", sorted(HF_TINY))
def test_transformers_config_objects_are_accepted(name):
    hf_cfg = copy.deepcopy(HF_TINY[name])
    hf_cfg.architectures = None
    cfg = load_config(hf_cfg)  # built in code: no architectures, the model_type names the family
    assert type(cfg).__name__ == type(hf_cfg).__name__
    assert_matches_hf(cfg, hf_cfg)


@given(
    rope_type=st.sampled_from(["yarn", "longrope"]),
    factor=st.one_of(st.none(), st.floats(1.0, 64.0)),
    mscale=st.one_of(st.none(), st.floats(0.1, 2.0)),
    mscale_all_dim=st.one_of(st.none(), st.floats(0.1, 2.0)),
    original=st.sampled_from([512, 1024, 4096]),
    stretch=st.sampled_from([1, 2, 8]),
    legacy=st.booleans(),
)
def test_derived_rope_values_match_transformers(rope_type, factor, mscale, mscale_all_dim, original, stretch, legacy):
    """factor and attention_factor as transformers derives them when computing the frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"factor": factor, "original_max_position_embeddings": original}
    if rope_type == "yarn":
        rope.update({k: v for k, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)) if v is not None})
    else:
        rope.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8)
    data = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": original * stretch}
    if legacy:  # 4.x: rope_theta beside rope_scaling with "type"
        data.update(rope_theta=5e5, rope_scaling={"type": rope_type, **rope})
    else:
        data.update(rope_parameters={"rope_type": rope_type, "rope_theta": 5e5, **rope})
    cfg = load_config(data)
    hf_cfg = hf_config(data)
    _, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg)
    assert cfg.rope_parameters["attention_factor"] == pytest.approx(attention_factor, rel=1e-12)
    want_factor = factor if factor is not None else stretch
    assert cfg.rope_parameters["factor"] == pytest.approx(want_factor, rel=1e-12)
    assert cfg.rope_parameters["rope_theta"] == 5e5
