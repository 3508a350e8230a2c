"""Tiny Llama and Mixtral on the NPU backend (over the torch_npu EMULATION, CPU) give the reference's logits.

Uses the conformance kit's model check (accel_models.testing.models.check_model): random seeded weights,
a mixed batch prefilled then decoded through each backend's own paged KV cache, logits compared with the
reference backend in float64 on the same (rounded) weights.
"""

from __future__ import annotations

import collections

import pytest
import torch

import accel_backend_npu
from accel_backend_npu import use_torch_npu
from accel_backend_npu.emulation import TorchNpuEmulation

models = pytest.importorskip("accel_models.testing.models", reason="accel_models.testing.models is not available")

DENSE = {"npu_rms_norm", "npu_add_rms_norm", "npu_mrope", "npu_swiglu", "npu_scatter_nd_update_"}
MOE = {"npu_moe_gating_top_k_softmax", "npu_moe_init_routing", "npu_moe_compute_expert_tokens",
       "npu_grouped_matmul", "npu_moe_finalize_routing"}


#: DeepSeek-V3 routes with grouped sigmoid top-k and a correction bias: npu_moe_gating_top_k, not its softmax form
DEEPSEEK_MOE = (MOE - {"npu_moe_gating_top_k_softmax"}) | {"npu_moe_gating_top_k"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("model", ["llama", "mixtral", "deepseek_v2", "deepseek_v3"])
def test_tiny_model_logits_match_reference(model: str, dtype: torch.dtype):
    before = collections.Counter(accel_backend_npu.FALLBACKS)
    with use_torch_npu(TorchNpuEmulation()) as emu:
        result = models.check_model(model, "npu", dtype=dtype, device="cpu", allow_unavailable=True)
    assert result["status"] == "pass", result
    called = set(emu.called())
    expected = DENSE | {"mixtral": MOE, "deepseek_v2": MOE, "deepseek_v3": DEEPSEEK_MOE}.get(model, set())
    if dtype == torch.bfloat16:
        expected.add("npu_fused_infer_attention_score")
    assert expected <= called, f"kernels not used: {sorted(expected - called)}"
    fell_back = {op for op, n in (collections.Counter(accel_backend_npu.FALLBACKS) - before).items() if n}
    # float32 attention has no fused kernel (npu_fused_infer_attention_score takes fp16/bf16): the reference
    # runs it on the backend's own cache; nothing else falls back.
    assert fell_back == (set() if dtype == torch.bfloat16 else {"paged_attention"}), fell_back
