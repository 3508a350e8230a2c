"""Model structure and checkpoint loading: prefixes, load_weights' result, MoE formats, bad checkpoints."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers builds the checkpoints these tests load")

from hf_cases import CASES, CASES_BY_NAME, SEQUENCES, checkpoint, hf_logits  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from accel_models import resolve_ops  # noqa: E402
from accel_models.config import load_config  # noqa: E402
from accel_models.context import BuildContext, build_context  # noqa: E402
from accel_models.errors import CheckpointError, UnsupportedModelError  # noqa: E402
from accel_models.loader import load_model  # noqa: E402
from accel_models.models import get_model_class, supported_architectures  # noqa: E402
from accel_models.runner import ModelRunner  # noqa: E402

IDS = [c.name for c in CASES]


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("hf_checkpoints")


def _build(path: str):
    config = load_config(path)
    with build_context(BuildContext(ops=resolve_ops("reference"), params_dtype=torch.float32)):
        return get_model_class(config.architecture)(config)


def _rel_err(ours, ref) -> float:
    scale = max(r.abs().max().item() for r in ref)
    return max((o - r).abs().max().item() for o, r in zip(ours, ref)) / scale


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_prefix_is_the_named_modules_path_and_load_weights_names_every_parameter(case, ckpt_root):
    path, _ = checkpoint(case, ckpt_root)
    model = _build(path)
    zoo_modules = 0
    for name, module in model.named_modules():
        if type(module).__module__.startswith("accel_models."):
            zoo_modules += 1
            assert getattr(module, "prefix", None) == name, f"{type(module).__name__} at {name!r}"
    assert zoo_modules > 10
    loaded = model.load_weights(load_file(Path(path) / "model.safetensors").items())
    assert loaded == {name for name, _ in model.named_parameters()}
    tied = case.hf_config().tie_word_embeddings
    assert ("lm_head.weight" in loaded) is (not tied)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_transformers_5_19_writes_per_expert_tensors(ckpt_root):
    """What save_pretrained writes today (the per-expert layout of published checkpoints)."""
    names = set(load_file(Path(checkpoint(CASES_BY_NAME["mixtral-8x2"], ckpt_root)[0]) / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.7.w3.weight" in names
    names = set(load_file(Path(checkpoint(CASES_BY_NAME["qwen3moe-8x2"], ckpt_root)[0]) / "model.safetensors"))
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names


def _to_stacked_experts(src: str, dst: Path, *, mixtral: bool) -> None:
    """Rewrite a per-expert checkpoint in transformers 5's in-memory layout: experts stacked per layer
    (``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``), Mixtral's MoE under ``mlp``."""
    shutil.copytree(src, dst)
    tensors = load_file(Path(src) / "model.safetensors")
    per_expert = re.compile(r"^(.*)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, t in tensors.items():
        m = per_expert.match(name)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(3)), {})[m.group(4)] = t
        else:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = t
    for layer, experts in groups.items():
        ids = sorted(experts)
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((experts[e][gate], experts[e][up])) for e in ids])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([experts[e][down] for e in ids])
    (dst / "model.safetensors").unlink()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["mixtral-8x2", "qwen2moe-60x4-shared", "qwen3moe-8x2", "deepseekv3-noaux-yarn"])
def test_stacked_expert_checkpoints_load_too(name, ckpt_root, tmp_path):
    case = CASES_BY_NAME[name]
    path, hf = checkpoint(case, ckpt_root)
    _to_stacked_experts(path, tmp_path / "stacked", mixtral=name.startswith("mixtral"))
    model = load_model(tmp_path / "stacked", backend="reference", dtype="float32", device="cpu")
    ours = ModelRunner(model).forward_sequences(SEQUENCES[:2])
    assert _rel_err(ours, hf_logits(hf, SEQUENCES[:2])) <= 1e-5


def _rewrite(src: str, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(Path(src) / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_bad_checkpoint_lists_every_missing_unexpected_and_misshaped_tensor(ckpt_root, tmp_path):
    path, _ = checkpoint(CASES_BY_NAME["qwen2moe-60x4-shared"], ckpt_root)

    def edit(t):
        del t["model.layers.0.self_attn.k_proj.weight"]
        del t["model.layers.0.mlp.experts.17.up_proj.weight"]
        t["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
        t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 36)
        t["model.layers.0.mlp.experts.3.gate_proj.weight"] = torch.zeros(23, 64)

    bad = _rewrite(path, tmp_path / "bad", edit)
    model = _build(str(bad))
    with pytest.raises(CheckpointError) as info:
        model.load_weights(load_file(bad / "model.safetensors").items())
    msg = str(info.value)
    for needle in ("model.layers.0.self_attn.qkv_proj.weight (shards k)",
                   "model.layers.0.mlp.experts.w13_weight (shards (17, 'w3')",
                   "model.layers.0.self_attn.extra_proj.weight",
                   "model.layers.1.mlp.down_proj.weight: shape mismatch",
                   "model.layers.0.mlp.experts.3.gate_proj.weight: shape mismatch"):
        assert needle in msg, msg
    # and through load_model: the same error, no model returned
    with pytest.raises(CheckpointError, match="extra_proj"):
        load_model(bad, backend="reference", dtype="float32", device="cpu")


def test_untied_checkpoint_without_lm_head_is_missing_a_tensor(ckpt_root, tmp_path):
    path, _ = checkpoint(CASES_BY_NAME["llama-gqa-hd32-default"], ckpt_root)
    bad = _rewrite(path, tmp_path / "nohead", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: lm_head\.weight"):
        _build(str(bad)).load_weights(load_file(bad / "model.safetensors").items())


def test_tied_checkpoint_with_a_head_copy_and_old_rotary_buffers_loads(ckpt_root, tmp_path):
    path, hf = checkpoint(CASES_BY_NAME["qwen2-sliding-tied"], ckpt_root)

    def edit(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    ok = _rewrite(path, tmp_path / "old", edit)
    model = load_model(ok, backend="reference", dtype="float32", device="cpu")
    assert _rel_err(ModelRunner(model).forward_sequences(SEQUENCES[1:]), hf_logits(hf, SEQUENCES[1:])) <= 1e-5


def test_registry_names_supported_architectures():
    archs = supported_architectures()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM",
            "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"} <= set(archs)
    with pytest.raises(UnsupportedModelError) as info:
        get_model_class("GPT2LMHeadModel")
    assert "GPT2LMHeadModel" in str(info.value) and "Qwen3MoeForCausalLM" in str(info.value)


def test_sliding_window_follows_hf_layer_rules(ckpt_root):
    qwen2 = _build(checkpoint(CASES_BY_NAME["qwen2-sliding-tied"], ckpt_root)[0])
    # Qwen2: layers at or after max_window_layers (1) slide
    assert [layer.self_attn.attn.sliding_window for layer in qwen2.model.layers] == [None, 4]
    mistral = _build(checkpoint(CASES_BY_NAME["mistral-sliding4"], ckpt_root)[0])
    assert [layer.self_attn.attn.sliding_window for layer in mistral.model.layers] == [4, 4]
    llama = _build(checkpoint(CASES_BY_NAME["llama-gqa-hd32-default"], ckpt_root)[0])
    assert [layer.self_attn.attn.sliding_window for layer in llama.model.layers] == [None, None]


def test_moe_layer_placement(ckpt_root):
    from accel_models.layers import FusedMoE

    def kinds(name):
        model = _build(checkpoint(CASES_BY_NAME[name], ckpt_root)[0])
        return [any(isinstance(m, FusedMoE) for m in layer.modules()) for layer in model.model.layers]

    assert kinds("qwen2moe-60x4-shared") == [True, False]  # mlp_only_layers=[1]
    assert kinds("qwen2moe-8x2-step2-norm") == [False, True]  # decoder_sparse_step=2


def test_model_forward_without_a_forward_context_says_how_to_run_it(ckpt_root):
    model = _build(checkpoint(CASES_BY_NAME["llama-gqa-hd32-default"], ckpt_root)[0])
    with pytest.raises(RuntimeError, match="forward context"):
        model(torch.tensor([1, 2]), torch.tensor([0, 1]))


def test_config_json_of_both_formats_builds_the_same_model(ckpt_root, tmp_path):
    """A transformers-4.x style config.json (rope_scaling, rope_theta, torch_dtype) gives the same logits."""
    path, hf = checkpoint(CASES_BY_NAME["llama-hd64-llama3"], ckpt_root)
    old = tmp_path / "old_format"
    shutil.copytree(path, old)
    cfg = json.loads((old / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("head_dim", None) if cfg.get("head_dim") == cfg["hidden_size"] // cfg["num_attention_heads"] else None
    (old / "config.json").write_text(json.dumps(cfg))
    model = load_model(old, backend="reference", dtype="float32", device="cpu")
    assert _rel_err(ModelRunner(model).forward_sequences(SEQUENCES[:1]), hf_logits(hf, SEQUENCES[:1])) <= 1e-5


def test_moe_with_an_unsupported_activation_is_refused_not_silently_silu():
    from accel_models.models.mixtral import MixtralMoE

    with build_context(BuildContext(ops=resolve_ops("reference"))):
        with pytest.raises(ValueError, match="hidden_act 'relu' is not supported for MoE experts"):
            MixtralMoE(4, 2, 8, 4, hidden_act="relu", prefix="model.layers.0.block_sparse_moe")
