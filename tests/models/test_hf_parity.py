"""Every family against Hugging Face transformers on the same (random, tiny) checkpoint.

The zoo model is loaded by ``accel_models.loader.load_model`` from what ``save_pretrained`` wrote and run
through the paged-KV path (``ModelRunner``: one mixed batch of all sequences); transformers runs each
sequence alone. Tolerances (max abs difference over max |logit|):

* float32: <= 1e-5.
* float64: <= 1e-10, with transformers' float32 islands (RMSNorm upcast, router softmax) widened to
  float64 (``widen_hf_to_float64``); ``moe_topk`` returns float64 routing weights for float64 logits.
* bfloat16: the zoo in bfloat16 against transformers in float32 is within 2x transformers-in-bfloat16's
  own error against float32, plus 1.6e-2 (the bfloat16 tolerance of DESIGN.md's table) of max |logit|.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is needed to compare against Hugging Face")

from hf_cases import CASES, SEQUENCES, checkpoint, hf_logits, widen_hf_to_float64  # noqa: E402

from accel_models.loader import load_model  # noqa: E402
from accel_models.runner import ModelRunner  # noqa: E402

IDS = [c.name for c in CASES]


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("hf_checkpoints")


def _rel_err(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    scale = max(r.abs().max().item() for r in ref)
    return max((o.to(r.dtype) - r).abs().max().item() for o, r in zip(ours, ref)) / scale


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float32_logits_match_transformers(case, ckpt_root):
    path, hf = checkpoint(case, ckpt_root)
    model = load_model(path, backend="reference", dtype="float32", device="cpu")
    ours = ModelRunner(model).forward_sequences(SEQUENCES)
    ref = hf_logits(hf, SEQUENCES)
    assert [o.shape for o in ours] == [r.shape for r in ref]
    assert _rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prefill_then_decode_matches_full_forward(case, ckpt_root):
    """Chunked prefill + decode steps (several sequences interleaved in mixed batches) == one full forward."""
    path, hf = checkpoint(case, ckpt_root)
    model = load_model(path, backend="reference", dtype="float32", device="cpu")
    runner = ModelRunner(model, block_size=4)  # small blocks: sequences span several blocks
    a, b = SEQUENCES[0], SEQUENCES[1]
    got: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    out = runner.step({"a": a[:5]})  # prefill chunk 1 of a
    got["a"].append(out["a"])
    out = runner.step({"a": a[5:8], "b": b[:3]})  # chunk 2 of a + prefill of b
    got["a"].append(out["a"])
    got["b"].append(out["b"])
    for i in range(8, len(a)):  # decodes of a, mixed with decodes of b while b lasts
        j = 3 + i - 8
        batch = {"a": [a[i]]} | ({"b": [b[j]]} if j < len(b) else {})
        out = runner.step(batch)
        for k, v in out.items():
            got[k].append(v)
    ref = hf_logits(hf, [a, b])
    ours = [torch.cat(got["a"]), torch.cat(got["b"])]
    assert _rel_err(ours, ref) <= 1e-5
    # and the incremental path equals the zoo's own one-batch forward to float32 rounding
    full = ModelRunner(model).forward_sequences([a, b])
    assert _rel_err(ours, full) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_logits_match_transformers(case, ckpt_root):
    path, hf = checkpoint(case, ckpt_root)
    hf64 = widen_hf_to_float64(copy.deepcopy(hf))
    model = load_model(path, backend="reference", dtype="float64", device="cpu")
    ours = ModelRunner(model).forward_sequences(SEQUENCES)
    assert ours[0].dtype == torch.float64
    ref = hf_logits(hf64, SEQUENCES)
    assert _rel_err(ours, ref) <= 1e-10


@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "llama-gqa-hd32-default", "qwen2-sliding-tied", "qwen3-hd64", "mixtral-8x2", "qwen2moe-60x4-shared",
    "deepseekv2-lite-yarn", "deepseekv3-noaux-yarn")],
    ids=lambda c: c.name)
def test_bfloat16_logits_within_dtype_tolerance(case, ckpt_root):
    path, hf = checkpoint(case, ckpt_root)
    ref32 = hf_logits(hf, SEQUENCES)
    hf_bf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), SEQUENCES)
    model = load_model(path, backend="reference", dtype="bfloat16", device="cpu")
    ours = ModelRunner(model).forward_sequences(SEQUENCES)
    hf_err = _rel_err(hf_bf16, ref32)
    our_err = _rel_err(ours, ref32)
    assert our_err <= 2 * hf_err + 1.6e-2, (our_err, hf_err)
