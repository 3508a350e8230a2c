"""The conformance kit (accel_models.testing) passes on the NPU backend bound over the torch_npu EMULATION."""

from __future__ import annotations

import torch

from accel_backend_npu import use_torch_npu
from accel_backend_npu.emulation import TorchNpuEmulation
from accel_models.backends import COMPOSITE_OPS, PORTABLE_OPS  # dense matmul: torch's own on the device
from accel_models.testing import run_conformance
from accel_models.testing.models import check_graphs, check_model


def test_kit_passes_on_the_emulated_npu_backend():
    with use_torch_npu(TorchNpuEmulation()):
        report = run_conformance("npu", allow_unavailable=True, quick=True, device="cpu", max_examples=5,
                                 dtypes=(torch.float32, torch.bfloat16))
        models = [check_model(m, "npu", dtype=torch.bfloat16, device="cpu", allow_unavailable=True)
                  for m in ("llama", "mixtral", "deepseek_v2", "deepseek_v3")]
        graphs = [check_graphs(m, "npu", dtype=torch.bfloat16, device="cpu", allow_unavailable=True)
                  for m in ("llama", "mixtral")]
    assert report.passed, [(r.op, r.status, r.message) for r in report.ops if r.status != "pass"]
    assert all(r.native for r in report.ops if r.op not in PORTABLE_OPS and r.op not in COMPOSITE_OPS), [r.op for r in report.ops if not r.native]
    assert all(r.cases > 0 for r in report.ops)
    assert all(m["status"] == "pass" for m in models), models
    assert all(g["status"] == "pass" for g in graphs), graphs  # ACL graphs over the graph-API emulation
