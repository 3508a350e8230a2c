"""accel_models.loader: checkpoint discovery, streaming, dtype/device, and errors that name the problem.

Checkpoints are written here by hand with safetensors, under Hugging Face's tensor names and shapes (an
independent statement of the format), so these tests do not depend on transformers except the last one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from accel_models import loader
from accel_models.context import BuildContext, ParallelGroup, get_build_context
from accel_models.errors import CheckpointError, ConfigError, UnsupportedModelError
from accel_models.loader import (
    LazyTensor,
    find_checkpoint_files,
    iter_checkpoint_tensors,
    load_generation_config,
    load_model,
    resolve_dtype,
)

CONFIG = {  # transformers 4.x style, as most published checkpoints
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
    "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
}


def hf_llama_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under transformers' Llama names and shapes ([out, in] linear weights)."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], cfg: dict | None = None, shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg or CONFIG))
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
        return path
    names = sorted(state)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[k::shards]}
        save_file(part, str(path / file))
        weight_map.update({n: file for n in part})
    (path / loader.SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return hf_llama_state(CONFIG)


@pytest.fixture()
def ckpt(tmp_path, state) -> Path:
    return write_checkpoint(tmp_path / "ckpt", state)


def named(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


# Tensors the zoo stores unfused under the checkpoint's own name (the fused qkv/gate_up are the models' tests).
DIRECT = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.1.self_attn.o_proj.weight",
          "model.layers.0.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight"]


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def test_loads_single_file_into_the_registry_model(ckpt, state):
    model = load_model(ckpt, backend="reference")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    params = named(model)
    assert all(not p.requires_grad for p in params.values())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params.values())  # None on CPU: fp32
    for name in DIRECT:
        assert torch.equal(params[name], state[name]), name


@pytest.mark.parametrize("dtype, want", [
    ("bfloat16", torch.bfloat16), (torch.float16, torch.float16), ("float64", torch.float64),
    ("auto", torch.bfloat16),  # config.json says bfloat16
    ("fp32", torch.float32),
])
def test_dtype_conversion(ckpt, state, dtype, want):
    params = named(load_model(ckpt, backend="reference", dtype=dtype))
    assert {p.dtype for p in params.values()} == {want}
    for name in DIRECT:
        assert torch.equal(params[name], state[name].to(want)), name


def test_auto_dtype_without_config_dtype_is_float32(tmp_path, state):
    cfg = {k: v for k, v in CONFIG.items() if k != "torch_dtype"}
    path = write_checkpoint(tmp_path / "c", state, cfg)
    assert {p.dtype for p in load_model(path, dtype="auto").parameters()} == {torch.float32}


def test_resolve_dtype_rules():
    from accel_models.config import load_config

    cfg = load_config(CONFIG)
    cpu, acc = torch.device("cpu"), torch.device("meta")  # meta stands in for an accelerator device
    assert resolve_dtype(None, cfg, cpu) is torch.float32
    assert resolve_dtype(None, cfg, acc) is torch.bfloat16
    assert resolve_dtype("half", cfg, cpu) is torch.float16
    with pytest.raises(ValueError, match="unsupported dtype 'int8'.*float32, bfloat16, float16, float64.*'auto'"):
        resolve_dtype("int8", cfg, cpu)
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        resolve_dtype(torch.int8, cfg, cpu)


def test_sharded_checkpoint_loads_like_single_file(tmp_path, state):
    single = named(load_model(write_checkpoint(tmp_path / "one", state)))
    sharded_dir = write_checkpoint(tmp_path / "three", state, shards=3)
    files = find_checkpoint_files(sharded_dir)
    assert len(files.files) == 3 and files.weight_map is not None
    sharded = named(load_model(sharded_dir))
    assert single.keys() == sharded.keys()
    for name in single:
        assert torch.equal(single[name], sharded[name]), name


def test_stray_safetensors_next_to_an_index_are_ignored(tmp_path, state):
    path = write_checkpoint(tmp_path / "c", state, shards=2)
    save_file({"junk": torch.zeros(1)}, str(path / "consolidated.safetensors"))
    load_model(path)  # only the index's shards are read


# ----------------------------------------------------------------------------------------------------
# Bad checkpoints
# ----------------------------------------------------------------------------------------------------


def test_missing_shard_is_named(tmp_path, state):
    path = write_checkpoint(tmp_path / "c", state, shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"1 of 3 shard files .* missing: model-00002-of-00003\.safetensors"):
        load_model(path)


def test_index_disagreeing_with_shards_is_named(tmp_path, state):
    path = write_checkpoint(tmp_path / "c", state, shards=2)
    index = json.loads((path / loader.SAFE_INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (path / loader.SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "disagrees" in msg and "model.layers.9.mlp.up_proj.weight (index: model-00001-of-00002.safetensors, found: nowhere)" in msg


def test_malformed_index(tmp_path, state):
    path = write_checkpoint(tmp_path / "c", state, shards=2)
    (path / loader.SAFE_INDEX).write_text('{"weight_map": {"a": ')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*malformed"):
        load_model(path)


def test_pickle_only_checkpoint_is_refused_with_a_conversion_hint(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(CONFIG))
    (path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "save_pretrained" in msg and "safetensors" in msg


def test_no_weights_at_all(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        load_model(tmp_path / "file")


@pytest.mark.parametrize("damage", ["truncate", "header", "garbage"])
def test_corrupted_safetensors_names_the_file(ckpt, damage):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncate": data[: len(data) - 100], "header": b"\xff" * 8 + data[8:], "garbage": b"oops"}[damage])
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    assert str(file) in str(err.value) and "corrupted" in str(err.value)


def test_missing_tensor_is_named(tmp_path, state):
    partial = {k: v for k, v in state.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(write_checkpoint(tmp_path / "c", partial))


def test_unexpected_tensor_is_named(tmp_path, state):
    extra = {**state, "model.layers.0.mlp.surprise_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.surprise_proj\.weight"):
        load_model(write_checkpoint(tmp_path / "c", extra))


def test_misshaped_tensor_is_named(tmp_path, state):
    bad = {**state, "model.norm.weight": torch.ones(63)}
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load_model(write_checkpoint(tmp_path / "c", bad))


def test_config_errors_surface_before_any_weight_is_read(tmp_path, state):
    path = write_checkpoint(tmp_path / "c", state, {**CONFIG, "architectures": ["BertModel"]})
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(path)


# ----------------------------------------------------------------------------------------------------
# The loader's own contract, with a stand-in model (so it holds whatever a model's load_weights does)
# ----------------------------------------------------------------------------------------------------


class StandIn(nn.Module):
    """Two parameters and a persistent buffer; records the build context and default dtype it saw."""

    seen: dict = {}
    behaviour = "ok"

    def __init__(self, config, prefix=""):
        super().__init__()
        ctx = get_build_context()
        StandIn.seen = {"ctx": ctx, "default_dtype": torch.get_default_dtype(),
                        "default_device": torch.empty(0).device}
        if StandIn.behaviour == "raise_in_init":
            raise RuntimeError("boom in __init__")
        self.norm = nn.Parameter(torch.empty(config.hidden_size, dtype=ctx.params_dtype))
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, dtype=ctx.params_dtype))
        self.register_buffer("table", torch.zeros(2))  # persistent: the checkpoint must provide it
        self.register_buffer("cache", torch.zeros(2), persistent=False)  # computed: not expected
        self.processed = False

    def process_weights_after_loading(self):
        self.processed = True

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            if StandIn.behaviour == "runtime_error":
                raise RuntimeError(f"size mismatch for {name}")
            if StandIn.behaviour == "stops_early":
                break
            target = {"model.norm.weight": "norm", "model.embed_tokens.weight": "embed"}.get(name)
            if target is not None:
                getattr(self, target).data.copy_(tensor)
                loaded.add(target)
        if StandIn.behaviour == "returns_none":
            return None
        if StandIn.behaviour == "claims_table":
            loaded.add("table")
        return loaded


@pytest.fixture()
def stand_in(monkeypatch):
    StandIn.behaviour = "ok"
    monkeypatch.setattr(loader, "_model_class", lambda config: StandIn)
    yield StandIn
    StandIn.behaviour = "ok"


def test_build_context_and_defaults_during_construction(ckpt, stand_in):
    from accel_models import resolve_ops

    ops = resolve_ops(backend="reference")
    group = ParallelGroup()
    factory = object()
    before = torch.get_default_dtype()
    stand_in.behaviour = "claims_table"
    model = load_model(ckpt, dtype="float64", ops=ops, tp_group=group, ep_enabled=True, attention_factory=factory)
    ctx: BuildContext = stand_in.seen["ctx"]
    assert ctx.ops is ops and ctx.tp_group is group and ctx.ep_enabled and ctx.attention_factory is factory
    assert ctx.params_dtype is torch.float64 and ctx.device == torch.device("cpu")
    assert stand_in.seen["default_dtype"] is torch.float64 and torch.get_default_dtype() is before
    assert model.processed and model.norm.dtype is torch.float64


def test_params_and_persistent_buffers_not_loaded_are_listed(ckpt, stand_in):
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert "1 parameter(s)" in msg and "table" in msg and "cache" not in msg


def test_foreign_errors_in_load_weights_become_checkpoint_errors(ckpt, stand_in):
    stand_in.behaviour = "runtime_error"
    with pytest.raises(CheckpointError, match="StandIn failed: RuntimeError: size mismatch for"):
        load_model(ckpt)


def test_load_weights_must_return_the_loaded_names(ckpt, stand_in):
    stand_in.behaviour = "returns_none"
    with pytest.raises(TypeError, match="must return the set of parameter names"):
        load_model(ckpt)


def test_load_weights_must_read_every_tensor(ckpt, stand_in):
    stand_in.behaviour = "stops_early"
    with pytest.raises(RuntimeError, match="stopped before reading 20 checkpoint tensor"):
        load_model(ckpt)


def test_default_dtype_is_restored_when_construction_fails(ckpt, stand_in):
    stand_in.behaviour = "raise_in_init"
    before = torch.get_default_dtype()
    with pytest.raises(RuntimeError, match="boom"):
        load_model(ckpt, dtype="float64")
    assert torch.get_default_dtype() is before


# ----------------------------------------------------------------------------------------------------
# Streaming helpers
# ----------------------------------------------------------------------------------------------------


def test_iter_checkpoint_tensors_converts_floats_only(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    save_file({"w": torch.randn(4, 6), "ids": torch.arange(5)}, str(path / "model.safetensors"))
    got = dict(iter_checkpoint_tensors(path, torch.bfloat16))
    assert got["w"].dtype is torch.bfloat16 and got["ids"].dtype is torch.int64


def test_lazy_tensors_read_slices(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    w = torch.randn(8, 6)
    save_file({"w": w}, str(path / "model.safetensors"))
    seen: set[str] = set()
    ((name, lazy),) = list(iter_checkpoint_tensors(path, torch.float64, lazy=True, seen=seen))
    assert isinstance(lazy, LazyTensor) and name == "w" and seen == {"w"} and lazy.shape == (8, 6)
    # read only a rank's rows (as a TP rank would), after the iterator moved on
    assert torch.equal(lazy[2:4], w[2:4].double())
    assert torch.equal(lazy.materialize(), w.double())
    assert torch.equal(lazy.narrow(1, 3, 2), w.narrow(1, 3, 2).double()) and lazy.size(0) == 8 and lazy.ndim == 2
    assert torch.equal(lazy.narrow(-1, 0, 3), w[:, :3].double())


def test_bad_device_is_a_value_error(ckpt):
    with pytest.raises(ValueError, match="device 'warp-drive' is not a torch device"):
        load_model(ckpt, device="warp-drive")


# ----------------------------------------------------------------------------------------------------
# generation_config.json
# ----------------------------------------------------------------------------------------------------


def test_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    gen = load_generation_config(tmp_path)  # no generation_config.json: ids from config.json
    assert gen.eos_token_ids == (2,) and gen.bos_token_id == 1 and gen.temperature is None
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [128001, 128009], "temperature": 0.6, "top_p": 0.9, "top_k": 20, "do_sample": True}))
    gen = load_generation_config(tmp_path)
    assert gen.eos_token_ids == (128001, 128009) and gen.bos_token_id == 1
    assert (gen.temperature, gen.top_p, gen.top_k, gen.do_sample) == (0.6, 0.9, 20, True)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "two"}')
    with pytest.raises(ConfigError, match="eos_token_id must be an int or a list of ints"):
        load_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text('{\n"top_k": 5,\n}')
    with pytest.raises(ConfigError, match=r"generation_config\.json.*line 3"):
        load_generation_config(tmp_path)


# ----------------------------------------------------------------------------------------------------
# End to end: a sharded checkpoint written by transformers gives transformers' logits
# ----------------------------------------------------------------------------------------------------


def test_sharded_save_pretrained_checkpoint_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")
    from accel_models.runner import ModelRunner

    hf_cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / loader.SAFE_INDEX).exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    model = load_model(tmp_path, backend="reference", dtype="float32")
    seq = [3, 17, 5, 88, 41, 9, 60]
    ours = ModelRunner(model).forward_sequences([seq])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
