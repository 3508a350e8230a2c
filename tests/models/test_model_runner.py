"""ModelRunner: cache allocation per Attention prefix, execute() with logits_indices, block bookkeeping."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers builds the checkpoint these tests load")

from hf_cases import CASES_BY_NAME, SEQUENCES, checkpoint, hf_logits  # noqa: E402

from accel_models.loader import load_model  # noqa: E402
from accel_models.runner import ModelRunner, build_attn_metadata  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path, hf = checkpoint(CASES_BY_NAME["qwen3-hd64"], tmp_path_factory.mktemp("runner"))
    return load_model(path, backend="reference", dtype="float32", device="cpu"), hf


def test_one_cache_per_attention_layer_and_execute_selects_rows(loaded):
    model, hf = loaded
    runner = ModelRunner(model, block_size=8, num_blocks=6)
    assert sorted(runner.kv_caches) == ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    assert runner.block_size == 8 and runner.num_blocks == 6
    a, b = SEQUENCES[0], SEQUENCES[1]
    md = build_attn_metadata([len(a), len(b)], [len(a), len(b)], [[4, 1], [0]], runner.block_size)
    ids = torch.tensor(a + b)
    positions = torch.tensor(list(range(len(a))) + list(range(len(b))))
    last = torch.tensor([len(a) - 1, len(a) + len(b) - 1])
    logits = runner.execute(ids, positions, md, logits_indices=last)
    assert logits.dtype == torch.float32 and logits.shape == (2, 128)
    ref = hf_logits(hf, [a, b])
    scale = max(r.abs().max() for r in ref)
    assert (logits[0] - ref[0][-1]).abs().max() <= 1e-5 * scale
    assert (logits[1] - ref[1][-1]).abs().max() <= 1e-5 * scale


def test_blocks_are_returned_and_a_full_cache_is_a_clear_error(loaded):
    model, _ = loaded
    runner = ModelRunner(model, block_size=4, num_blocks=3, max_model_len=64)
    runner.step({"x": list(range(10))})  # 3 blocks
    with pytest.raises(RuntimeError, match="KV cache full"):
        runner.step({"y": [1]})
    runner.free("x")
    runner.step({"y": [1, 2, 3, 4, 5]})
    with pytest.raises(ValueError, match="max_model_len"):
        ModelRunner(model, max_model_len=8).step({"z": list(range(9))})


def test_unsupported_block_size_names_the_supported_ones(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="block_size 3 is not supported"):
        ModelRunner(model, block_size=3)
