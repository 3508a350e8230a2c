"""DeepSeek-V2/V3 specifics: config rules, float32 routing in 16-bit models, MTP layers, the MLA head layout.

Logit parity with transformers (float32, float64, bfloat16, chunked prefill + decode, TP/EP) runs in
test_hf_parity.py / test_model_tp2_gloo.py over the DeepSeek cases of hf_cases.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers builds the checkpoints these tests load")

from hf_cases import CASES_BY_NAME, SEQUENCES, checkpoint, hf_logits  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from accel_models.config import load_config  # noqa: E402
from accel_models.errors import CheckpointError, ConfigError  # noqa: E402
from accel_models.layers import FusedMoE  # noqa: E402
from accel_models.loader import load_model  # noqa: E402
from accel_models.runner import ModelRunner  # noqa: E402


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("hf_checkpoints")


def _rel_err(ours, ref) -> float:
    scale = max(r.abs().max().item() for r in ref)
    return max((o.to(r.dtype) - r).abs().max().item() for o, r in zip(ours, ref)) / scale


V3 = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=48,
          num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
          qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
          n_group=4, topk_group=2)


@pytest.mark.parametrize("change, needle", [
    (dict(n_group=None), "needs n_group and topk_group"),
    (dict(n_group=3), "multiple of n_group"),
    (dict(topk_group=5), "larger than n_group"),
    (dict(num_experts_per_tok=5), "exceeds the experts of the topk_group"),
    (dict(n_group=8, topk_group=2), "at least 2 experts per group"),
    (dict(num_experts_per_tok=9, n_group=1, topk_group=1), "larger than n_routed_experts"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor is not supported with MLA"),
    (dict(topk_method="sparse"), "topk_method"),
    (dict(n_routed_experts=None), "n_routed_experts"),
])
def test_bad_deepseek_configs_say_what_is_wrong(change, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config({**V3, **change})


def test_config_normalizes_as_transformers():
    v3 = load_config({**V3, "head_dim": 999, "num_key_value_heads": 1, "num_local_experts": 8})
    assert (v3.head_dim, v3.num_key_value_heads, v3.n_routed_experts) == (8, 2, 8)  # head_dim: the rotary width
    assert (v3.scoring_func, v3.topk_method, v3.norm_topk_prob, v3.rope_interleave) == ("sigmoid", "noaux_tc", True,
                                                                                        True)
    assert [v3.is_moe_layer(i) for i in range(2)] == [False, False]  # first_k_dense_replace defaults to 3
    assert v3.num_nextn_predict_layers == 1  # transformers' default for V3
    v2 = load_config({**V3, "architectures": ["DeepseekV2ForCausalLM"], "rope_interleave": False,
                      "first_k_dense_replace": 1, "moe_layer_freq": 1})
    assert (v2.scoring_func, v2.topk_method, v2.rope_interleave) == ("softmax", "greedy", True)  # V2 always interleaves
    assert [v2.is_moe_layer(i) for i in range(2)] == [False, True]


def _attn(name: str, ckpt_root, **kw):
    path, _ = checkpoint(CASES_BY_NAME[name], ckpt_root)
    return load_model(path, backend="reference", dtype="float32", device="cpu", **kw).model.layers[0].self_attn


def test_mla_heads_are_laid_out_for_the_shared_paged_attention(ckpt_root):
    """Expanded cache: each head attends as [rotary | non-rotary], padded to one width. Latent cache: one key
    head of [rotary key | latent] for every query head."""
    attn = _attn("deepseekv3-halves-wide-v", ckpt_root)  # expanded; qk 16 + 8, v 32
    assert not attn.latent_cache
    assert (attn.attn_head_size, attn.attn.head_size, attn.attn.num_kv_heads) == (32, 32, 4)
    assert (attn.rotary_emb.rotary_dim, attn.rotary_emb.is_neox) == (8, True)
    attn = _attn("deepseekv2-qlora-grouped", ckpt_root)  # expanded
    assert (attn.attn_head_size, attn.rotary_emb.rotary_dim, attn.rotary_emb.is_neox) == (24, 8, False)
    attn = _attn("deepseekv2-lite-yarn", ckpt_root)  # auto -> latent on the reference backend
    assert attn.latent_cache and (attn.attn.head_size, attn.attn.num_kv_heads, attn.attn.num_heads) == (40, 1, 4)
    assert (attn.rotary_emb.rotary_dim, attn.rotary_emb.is_neox) == (8, False)


def test_latent_cache_is_smaller_and_auto_falls_back_where_the_backend_refuses_the_head_size(ckpt_root, tmp_path,
                                                                                                monkeypatch):
    from accel_models.backends import resolve_ops

    path, hf = checkpoint(CASES_BY_NAME["deepseekv2-lite-yarn"], ckpt_root)
    latent = ModelRunner(load_model(path, backend="reference", dtype="float32", device="cpu"), num_blocks=4)
    expanded_dir = tmp_path / "expanded"
    shutil.copytree(path, expanded_dir)
    cfg = json.loads((expanded_dir / "config.json").read_text())
    (expanded_dir / "config.json").write_text(json.dumps({**cfg, "mla_cache": "expanded"}))
    expanded = ModelRunner(load_model(expanded_dir, backend="reference", dtype="float32", device="cpu"), num_blocks=4)
    size = {name: sum(c.numel() for c in r.kv_caches.values()) for name, r in (("l", latent), ("e", expanded))}
    assert size["e"] == size["l"] * (4 * 24 * 2) // (40 * 2)  # 4 heads x max(24, 16) x (k, v) vs (32 + 8) x 2
    # a backend whose attention refuses the latent head size: auto takes the expanded cache; latent is an error
    ops = resolve_ops("reference")
    real = ops.kv_cache_layout

    def layout(*, num_kv_heads, head_size, dtype):
        if head_size > 32:
            raise ValueError(f"head_size {head_size} is not supported; supported: 1..32")
        return real(num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)

    monkeypatch.setattr(ops, "kv_cache_layout", layout)
    small = load_model(path, ops=ops, dtype="float32", device="cpu")
    assert not small.model.layers[0].self_attn.latent_cache
    assert _rel_err(ModelRunner(small).forward_sequences(SEQUENCES), hf_logits(hf, SEQUENCES)) <= 1e-5
    forced = tmp_path / "latent"
    shutil.copytree(path, forced)
    (forced / "config.json").write_text(json.dumps({**cfg, "mla_cache": "latent"}))
    with pytest.raises(ValueError, match=r"mla_cache 'latent' needs one KV head of .* = 40 channels"):
        load_model(forced, ops=ops, dtype="float32", device="cpu")
    # MoE placement: first_k_dense_replace=1
    kinds = [any(isinstance(m, FusedMoE) for m in layer.modules()) for layer in
             load_model(checkpoint(CASES_BY_NAME["deepseekv3-noaux-yarn"], ckpt_root)[0], backend="reference",
                        dtype="float32", device="cpu").model.layers]
    assert kinds == [False, True]


def test_router_and_correction_bias_stay_float32_in_a_bfloat16_model(ckpt_root):
    path, hf = checkpoint(CASES_BY_NAME["deepseekv3-noaux-yarn"], ckpt_root)
    stored = load_file(Path(path) / "model.safetensors")
    bias = stored["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and not torch.equal(bias, bias.bfloat16().float())  # bf16 would round it
    model = load_model(path, backend="reference", dtype="bfloat16", device="cpu")
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, bias)
    assert torch.equal(gate.weight, stored["model.layers.1.mlp.gate.weight"])
    assert model.model.layers[1].mlp.experts.w13_weight.dtype == torch.bfloat16
    # float64 models route in float64 (no float32 island)
    model64 = load_model(path, backend="reference", dtype="float64", device="cpu")
    assert model64.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float64


def _with_mtp_layer(src: str, dst: Path, *, declare: bool) -> Path:
    """DeepSeek-V3's layout: a multi-token-prediction layer stored after the decoder layers."""
    shutil.copytree(src, dst)
    tensors = load_file(Path(src) / "model.safetensors")
    for name in [n for n in tensors if n.startswith("model.layers.1.")]:
        tensors[name.replace("model.layers.1.", "model.layers.2.")] = tensors[name].clone()
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.2.enorm.weight"] = torch.ones(64)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1 if declare else 0
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_multi_token_prediction_layers_are_skipped_only_when_declared(ckpt_root, tmp_path):
    path, hf = checkpoint(CASES_BY_NAME["deepseekv3-noaux-yarn"], ckpt_root)
    ok = _with_mtp_layer(path, tmp_path / "mtp", declare=True)
    model = load_model(ok, backend="reference", dtype="float32", device="cpu")
    assert len(model.model.layers) == 2
    assert _rel_err(ModelRunner(model).forward_sequences(SEQUENCES[:2]), hf_logits(hf, SEQUENCES[:2])) <= 1e-5
    bad = _with_mtp_layer(path, tmp_path / "undeclared", declare=False)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.2\.eh_proj\.weight"):
        load_model(bad, backend="reference", dtype="float32", device="cpu")


def test_missing_correction_bias_is_reported(ckpt_root, tmp_path):
    path, _ = checkpoint(CASES_BY_NAME["deepseekv3-noaux-yarn"], ckpt_root)
    bad = tmp_path / "nobias"
    shutil.copytree(path, bad)
    tensors = load_file(Path(path) / "model.safetensors")
    del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.gate\.e_score_correction_bias"):
        load_model(bad, backend="reference", dtype="float32", device="cpu")


@pytest.mark.parametrize("name", ["deepseekv2-lite-yarn", "deepseekv3-noaux-yarn"])
def test_llm_generates_transformers_greedy_tokens(name, ckpt_root):
    """The runtime end to end (scheduler, paged cache across blocks, prefix caching, sampler) on DeepSeek."""
    from accel_models import LLM, SamplingParams

    path, hf = checkpoint(CASES_BY_NAME[name], ckpt_root)
    prompts = [[3, 17, 42, 5, 99, 127, 0, 64], [9, 8, 7], [3, 17, 42, 5, 99, 1]]  # the third shares a prefix
    expected = []
    with torch.no_grad():
        for p in prompts:  # transformers' greedy continuation, past any EOS (as ignore_eos)
            ids = list(p)
            for _ in range(12):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(ids[len(p):])
    with LLM(path, backend="reference", dtype="float32", block_size=4) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected


#: DeepSeek-V2-Lite's published config.json (fields as on the hub, auto_map left out)
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
#: DeepSeek-V3's (its checkpoint is fp8: quantization_config)
V3_FULL = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
    "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
}


def test_published_configs_load_as_transformers_reads_them():
    import math

    import transformers

    lite = load_config(V2_LITE)
    hf = transformers.DeepseekV2Config.from_dict(V2_LITE)
    assert (lite.head_dim, lite.qk_head_dim, lite.num_key_value_heads) == (64, 192, 16)
    mscale = 0.1 * 0.707 * math.log(40) + 1
    assert lite.mla_softmax_scale == pytest.approx(192 ** -0.5 * mscale**2, rel=1e-12)
    assert lite.rope_parameters["attention_factor"] == pytest.approx(1.0)  # mscale == mscale_all_dim
    assert [lite.is_moe_layer(i) for i in (0, 1, 26)] == [False, True, True] == [
        i >= hf.first_k_dense_replace for i in (0, 1, 26)]
    assert (lite.bos_token_id, lite.eos_token_id, lite.dtype) == (100000, 100001, "bfloat16")
    assert not lite.uses_expert_groups  # greedy (n_group 1 is carried but unused)
    with pytest.raises(ConfigError, match="quantized checkpoints are not supported yet.*'fp8'"):
        load_config(V3_FULL)
    v3 = load_config({k: v for k, v in V3_FULL.items() if k != "quantization_config"})
    assert (v3.uses_expert_groups, v3.num_nextn_predict_layers, v3.rope_interleave) == (True, 1, True)
    assert [v3.is_moe_layer(i) for i in (2, 3)] == [False, True]


@pytest.mark.parametrize("backend, latent", [("reference", True), ("cpu", True), ("cuda", False), ("gcu", False)])
def test_auto_cache_at_the_published_shape_follows_the_backends_attention(backend, latent):
    """576-channel latent heads where the backend's kv_cache_layout takes them, expanded 192-channel heads
    where its attention stops at 256 (built on the meta device: no memory)."""
    from accel_models.backends import resolve_ops
    from accel_models.context import BuildContext, build_context
    from accel_models.models import get_model_class

    config = load_config({**V2_LITE, "num_hidden_layers": 2})
    ops = resolve_ops(backend, allow_unavailable=True)
    with build_context(BuildContext(ops=ops, params_dtype=torch.bfloat16, device=torch.device("meta"))):
        model = get_model_class(config.architecture)(config)
    attn = model.model.layers[1].self_attn
    assert attn.latent_cache is latent
    heads, size = (1, 576) if latent else (16, 192)
    assert (attn.attn.num_kv_heads, attn.attn.head_size) == (heads, size)
    bytes_per_token = ops.kv_cache_layout(num_kv_heads=heads, head_size=size, dtype=torch.bfloat16).bytes_per_token
    assert bytes_per_token == (2 * 576 * 2 if latent else 2 * 16 * 192 * 2)  # 2304 vs 12288: 5.3x
