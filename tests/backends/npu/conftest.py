"""Shared setup for the NPU backend's tests: the backend bound over the torch_npu EMULATION (CPU)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import accel_models
from accel_models.backends import COMPOSITE_OPS, OPTIONAL_OPS, PORTABLE_OPS
from accel_backend_npu import use_torch_npu
from accel_backend_npu.emulation import TorchNpuEmulation

# FlagGems' resolution table (DESIGN.md): results are compared with a float64 reference.
RTOL = {torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


@dataclass
class NpuEnv:
    """The NPU op table bound over an injected emulation, and that emulation (to inspect its calls)."""

    emu: TorchNpuEmulation
    ops: accel_models.OpTable
    ref: accel_models.OpTable

    def calls_since(self, n: int) -> list[str]:
        return [c.name for c in self.emu.calls[n:]]


@pytest.fixture(scope="module")
def npu() -> NpuEnv:
    """Module-scoped (hypothesis forbids function-scoped fixtures in @given tests)."""
    with use_torch_npu(TorchNpuEmulation()) as emu:
        ops = accel_models.resolve_ops(backend="npu", allow_unavailable=True, strict=True)
        # every op from the npu backend (optional backend-level hooks such as capture_graph, API 1.1, and the
        # fused ops of API 1.3, bound as composites of the npu's own ops, aside)
        assert {p for op, p in ops.providers.items()
                if op not in OPTIONAL_OPS and op not in PORTABLE_OPS and op not in COMPOSITE_OPS} == {"npu"}, ops.providers
        yield NpuEnv(emu, ops, accel_models.resolve_ops(backend="reference"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 reduce: int = 1) -> None:
    """|actual - expected| <= rtol * (|expected| + max|expected|) in float64, rtol from the dtype's row
    of the table, widened by sqrt(reduce) for results summed over ``reduce`` terms in that dtype."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    rtol = RTOL[dtype] * max(1.0, math.sqrt(reduce) / 4)
    scale = max(e.abs().max().item(), 1e-30) if e.numel() else 1.0
    err = (a - e).abs()
    bound = rtol * (e.abs() + scale)
    bad = err > bound
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {e.numel()} elements off; max error "
                                 f"{err.max().item():.3e} (rtol {rtol:.2e}, scale {scale:.3e})")
