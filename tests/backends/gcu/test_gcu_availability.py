"""Where torch_gcu is absent: the GCU backend installs, imports, reports itself unusable with the reason, and
selecting it is a clear error. Plus the schema checker the op tests rely on rejects bad calls."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

import accel_models
import gcu_abi

no_torch_gcu = pytest.mark.skipif(importlib.util.find_spec("torch_gcu") is not None,
                                  reason="torch_gcu is installed here: the backend may be usable")


@no_torch_gcu
def test_import_and_info_without_torch_gcu():
    mod = importlib.import_module("accel_backend_gcu")
    info = mod.accel_backend_info()
    assert info.name == "gcu" and info.device_type == "gcu" and info.dist_backend == "eccl"
    assert info.available is False
    assert "torch_gcu is not installed" in info.reason and "TopsRider" in info.reason and "vllm-gcu" in info.reason


@no_torch_gcu
def test_listed_as_unusable_with_reason():
    (row,) = [b for b in accel_models.list_backends() if b.name == "gcu"]
    assert not row.usable and "torch_gcu" in row.reason
    # every numeric op is implemented (graph capture is an optional backend hook the GCU backend lacks)
    backends = accel_models.backends
    # dense matmul (the linear group) stays in torch on GCUs: torch_gcu runs F.linear itself
    assert row.ops == (frozenset(backends.PRIMITIVE_OPS) - frozenset(backends.OPTIONAL_OPS)
                       - frozenset(backends.PORTABLE_OPS))


@no_torch_gcu
def test_selecting_gcu_is_a_clear_error(monkeypatch):
    with pytest.raises(accel_models.BackendError, match=r"'gcu' is installed but unusable here: torch_gcu is not installed"):
        accel_models.resolve_ops(backend="gcu")
    monkeypatch.setenv("ACCEL_BACKEND", "gcu")
    with pytest.raises(accel_models.BackendError, match="torch_gcu is not installed"):
        accel_models.resolve_ops()


@no_torch_gcu
def test_op_without_kernels_names_what_is_missing():
    ops = accel_models.resolve_ops(backend="gcu", allow_unavailable=True)
    from accel_backend_gcu import GCUKernelsUnavailable

    with pytest.raises(GCUKernelsUnavailable, match="torch_gcu.*use_kernels"):
        ops.silu_and_mul(x=torch.randn(2, 16))


def test_bad_shapes_are_value_errors_before_any_kernel():
    ops = accel_models.resolve_ops(backend="gcu", allow_unavailable=True)
    with pytest.raises(ValueError, match="weight has shape"):
        ops.rms_norm(x=torch.randn(2, 16), weight=torch.ones(8), eps=1e-6)
    with pytest.raises(ValueError, match="float64"):
        ops.rms_norm(x=torch.randn(2, 16, dtype=torch.float64), weight=torch.ones(16, dtype=torch.float64), eps=1e-6)
    with pytest.raises(ValueError, match="even"):
        ops.silu_and_mul(x=torch.randn(2, 15))
    with pytest.raises(ValueError, match="scoring_func"):
        ops.moe_topk(router_logits=torch.randn(2, 4), top_k=1, scoring_func="relu", renormalize=False,
                     num_expert_group=None, topk_group=None, e_score_correction_bias=None, routed_scaling_factor=1.0)


def test_schema_checker_rejects_bad_calls():
    """The checks every recorded kernel call goes through can fail."""
    schema = gcu_abi.gcu_schema("_C::rms_norm")
    t = torch.empty(2, 8)
    gcu_abi.check_call("_C::rms_norm", schema, (t, t, torch.ones(8), 1e-6), {}, source="test")
    with pytest.raises(AssertionError, match="positional"):
        gcu_abi.check_call("_C::rms_norm", schema, (t, t, t, 1e-6, 1), {}, source="test")
    with pytest.raises(AssertionError, match="missing"):
        gcu_abi.check_call("_C::rms_norm", schema, (t, t, t), {}, source="test")
    with pytest.raises(AssertionError, match="expects float"):
        gcu_abi.check_call("_C::rms_norm", schema, (t, t, t, "1e-6"), {}, source="test")
    with pytest.raises(AssertionError, match="expects Tensor"):
        gcu_abi.check_call("_C::rms_norm", schema, (t, t, None, 1e-6), {}, source="test")
    with pytest.raises(AssertionError, match="unknown keyword"):
        gcu_abi.check_call("_C::rms_norm", schema, (t, t, t), {"eps": 1e-6}, source="test")
    with pytest.raises(AssertionError, match="not contiguous"):
        gcu_abi.check_call("_C::rms_norm", schema, (t, t.t(), t, 1e-6), {}, source="test", check_layout=True)
    odd = torch.empty(2, 2)[:1, :1]  # [1, 1] with strides (2, 1): torch calls it contiguous, kernels may not
    with pytest.raises(AssertionError, match="not contiguous"):
        gcu_abi.check_call("_C::rms_norm", schema, (t, odd, t, 1e-6), {}, source="test", check_layout=True)
    rope = gcu_abi.gcu_schema("_C::rotary_embedding")  # key is not optional in vllm-gcu's schema
    with pytest.raises(AssertionError, match="'key' expects Tensor"):
        gcu_abi.check_call("_C::rotary_embedding", rope, (t, t, None, 8, t, True), {}, source="test")
    with pytest.raises(AssertionError, match="not among those vllm-gcu passes"):
        gcu_abi.check_flash_attn_call((), {"q": t, "k": t, "v": t, "max_seqlen_q": 1, "cu_seqlens_q": t,
                                           "max_seqlen_k": 1, "dropout_p": 0.1}, )
    with pytest.raises(AssertionError, match="lacks required"):
        gcu_abi.check_flash_attn_call((), {"q": t, "k": t, "v": t})
