"""The example backend proves itself with the accel-models conformance kit, as any backend would."""

import torch

import accel_models
from accel_models.testing import BackendConformance, run_conformance


class TestExampleBackend(BackendConformance):
    backend = "example"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)


def test_installed_through_its_entry_point():
    (status,) = [b for b in accel_models.list_backends() if b.name == "example"]
    assert status.usable and status.source == "entry point"
    assert status.ops == {"rms_norm", "silu_and_mul"}


def test_everything_else_falls_back_to_the_reference():
    ops = accel_models.resolve_ops("example")
    assert ops.providers["rms_norm"] == "example"
    assert ops.providers["silu_and_mul"] == "example"
    # graph capture (a backend-level hook), dense matmul and the greedy argmax (API 1.6; torch's own, on
    # every device) are not fallbacks; fused ops (API 1.3-1.5) are composites of the table's own ops
    assert set(ops.fallbacks) == set(ops.providers) - {"rms_norm", "silu_and_mul", "capture_graph", "prepare_linear", "linear",
                                                       "argmax", "rope_and_write_kv_cache", "act_and_mul_linear",
                                                       "decoder_layer_decode", "moe_decoder_layer_decode"}
    assert ops.providers["argmax"] == "reference"
    assert ops.providers["linear"] == "reference"


def test_report_marks_native_and_fallback_ops():
    report = run_conformance("example", ops=["rms_norm", "silu_and_mul", "moe_topk"], quick=True)
    by_op = {r.op: r for r in report.ops}
    assert report.passed
    assert by_op["rms_norm"].native and by_op["silu_and_mul"].native
    assert not by_op["moe_topk"].native and by_op["moe_topk"].provider == "reference"
