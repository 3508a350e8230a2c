"""The conformance kit passes a correct backend and catches deliberately wrong ones, op by op."""

from __future__ import annotations

import json
import types

import pytest
import torch

import accel_models
from accel_models import BackendInfo, hookimpl
from accel_models.cli import main
from accel_models.testing import run_conformance
from accel_models.testing.tolerances import DTYPE_TOLERANCES, error_ratio, tolerance

ref = accel_models.resolve_ops("reference")


def _wrong_backend() -> types.SimpleNamespace:
    """Three defects the kit must catch, each named by its op:
    rms_norm off by 1e-3 relative; attention ignoring the sliding window; moe_topk not renormalizing."""

    @hookimpl
    def accel_backend_info():
        return BackendInfo(name="wrong", device_type="cpu", available=True, reason=None)

    @hookimpl
    def accel_rms_norm(x, weight, eps):
        return ref.rms_norm(x=x, weight=weight, eps=eps) * (1 + 1e-3)

    @hookimpl
    def accel_kv_cache_layout(num_kv_heads, head_size, dtype):
        return ref.kv_cache_layout(num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)

    @hookimpl
    def accel_allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_size, dtype, device):
        return ref.allocate_kv_cache(num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
                                     head_size=head_size, dtype=dtype, device=device)

    @hookimpl
    def accel_write_kv_cache(key, value, kv_cache, slot_mapping):
        return ref.write_kv_cache(key=key, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)

    @hookimpl
    def accel_paged_attention(query, kv_cache, block_table, seq_lens, query_start_loc, max_query_len, max_seq_len,
                              scale, sliding_window, logits_soft_cap):
        return ref.paged_attention(query=query, kv_cache=kv_cache, block_table=block_table, seq_lens=seq_lens,
                                   query_start_loc=query_start_loc, max_query_len=max_query_len,
                                   max_seq_len=max_seq_len, scale=scale, sliding_window=None,
                                   logits_soft_cap=logits_soft_cap)

    @hookimpl
    def accel_moe_topk(router_logits, top_k, scoring_func, renormalize, num_expert_group, topk_group,
                       e_score_correction_bias, routed_scaling_factor):
        return ref.moe_topk(router_logits=router_logits, top_k=top_k, scoring_func=scoring_func, renormalize=False,
                            num_expert_group=num_expert_group, topk_group=topk_group,
                            e_score_correction_bias=e_score_correction_bias,
                            routed_scaling_factor=routed_scaling_factor)

    return types.SimpleNamespace(**{k: v for k, v in locals().items() if k.startswith("accel_")})


@pytest.fixture
def wrong_backend():
    accel_models.register_backend(_wrong_backend(), "wrong")
    yield "wrong"
    accel_models.unregister_backend("wrong")


def test_reference_backend_passes_the_kit():
    report = run_conformance("reference", quick=True)
    assert report.passed, [(r.op, r.message) for r in report.ops if r.status != "pass"]
    assert all(r.cases > 0 for r in report.ops)


def test_each_defect_is_caught_and_named(wrong_backend):
    report = run_conformance(wrong_backend, ops=["rms_norm", "paged_attention", "moe_topk", "silu_and_mul"],
                             quick=True, dtypes=(torch.float32,))
    by_op = {r.op: r for r in report.ops}
    assert not report.passed
    assert {"rms_norm", "paged_attention", "moe_topk"} <= set(report.failures())
    assert by_op["rms_norm"].status == "fail" and by_op["rms_norm"].native
    assert by_op["paged_attention"].status == "fail"
    assert by_op["moe_topk"].status == "fail"
    # the KV-cache group shares paged_attention's verdict; a fallback op still passes
    assert by_op["write_kv_cache"].status == "fail"
    assert by_op["silu_and_mul"].status == "pass" and not by_op["silu_and_mul"].native


def test_check_cli_exit_code_and_table(wrong_backend, capsys):
    rc = main(["check", "--backend", wrong_backend, "--ops", "rms_norm,silu_and_mul", "--quick", "--no-models"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED: rms_norm" in out
    assert "fallback (reference)" in out

    rc = main(["check", "--backend", "reference", "--ops", "rms_norm", "--quick", "--no-models", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["passed"] and data["ops"][0]["op"] == "rms_norm"


def test_check_cli_unknown_backend_and_op(capsys):
    assert main(["check", "--backend", "nosuch", "--quick", "--no-models"]) == 2
    assert "not installed" in capsys.readouterr().err
    assert main(["check", "--backend", "reference", "--ops", "nosuch", "--no-models"]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_tolerance_metric_is_not_vacuous():
    rtol, atol = tolerance("rms_norm", torch.float32)
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    assert error_ratio(x, x, rtol, atol) == 0.0
    assert error_ratio(x * (1 + 1e-3), x, rtol, atol) > 1.0  # the 1e-3 defect is far outside fp32 tolerance
    assert error_ratio(x.float() * (1 + 2**-24), x, rtol, atol) <= 1.0  # one fp32 rounding passes
    assert error_ratio(torch.full((3,), float("nan")), x[:3], rtol, atol) == float("inf")
    assert error_ratio(x[:3], x[:4], rtol, atol) == float("inf")
    assert DTYPE_TOLERANCES[torch.bfloat16][0] == 1.6e-2  # FlagGems' resolution table


def test_writing_a_backend_doc_is_generated_from_the_hookspecs():
    from pathlib import Path

    from accel_models.testing.docs import BEGIN, END, render

    doc = Path(__file__).resolve().parents[2] / "docs" / "writing-a-backend.md"
    text = doc.read_text()
    generated = text[text.index(BEGIN): text.index(END) + len(END)]
    assert generated == render(), "docs/writing-a-backend.md is stale: run python -m accel_models.testing.docs"


def test_model_level_check_passes_reference_and_catches_wrong_rms_norm(wrong_backend):
    from accel_models.testing.models import check_model

    good = check_model("llama", "reference", dtype=torch.float32, device="cpu")
    assert good["status"] == "pass", good
    bad = check_model("llama", wrong_backend, dtype=torch.float32, device="cpu")
    assert bad["status"] == "fail" and float(bad["error"]) > 1e-4, bad


def _misrouting_backend(skip_bias: bool) -> types.SimpleNamespace:
    """moe_topk defects that a model check must not excuse as rounding: the correction bias ignored, or each
    token's best expert replaced by its worst."""

    @hookimpl
    def accel_backend_info():
        return BackendInfo(name="misrouting", device_type="cpu", available=True, reason=None)

    @hookimpl
    def accel_moe_topk(router_logits, top_k, scoring_func, renormalize, num_expert_group, topk_group,
                       e_score_correction_bias, routed_scaling_factor):
        kw = dict(router_logits=router_logits, top_k=top_k, scoring_func=scoring_func, renormalize=renormalize,
                  num_expert_group=num_expert_group, topk_group=topk_group,
                  e_score_correction_bias=None if skip_bias else e_score_correction_bias,
                  routed_scaling_factor=routed_scaling_factor)
        weights, ids = ref.moe_topk(**kw)
        if not skip_bias:
            ids = ids.clone()
            ids[:, 0] = router_logits.argmin(-1).to(ids.dtype)
        return weights, ids

    return types.SimpleNamespace(**{k: v for k, v in locals().items() if k.startswith("accel_")})


@pytest.mark.parametrize("model, skip_bias", [("mixtral", False), ("deepseek_v3", False), ("deepseek_v3", True)])
def test_model_check_fails_routing_that_is_not_a_near_tie(model, skip_bias):
    from accel_models.testing.models import check_model

    accel_models.register_backend(_misrouting_backend(skip_bias), "misrouting")
    try:
        bad = check_model(model, "misrouting", dtype=torch.bfloat16, device="cpu")
    finally:
        accel_models.unregister_backend("misrouting")
    assert bad["status"] == "fail" and "routing differs beyond a near-tie" in bad["message"], bad
    assert ".experts token " in bad["message"]


def test_model_check_takes_near_tie_routing_the_backends_way():
    """bfloat16 rounding breaks near-ties between experts either way; the check resolves them the backend's way
    (the reference's own choice would put this seed's tiny Mixtral 0.18 of max |logit| away) and says so."""
    from accel_models.testing.models import MODEL_TOLERANCE, check_model

    got = check_model("mixtral", "reference", dtype=torch.bfloat16, device="cpu", seed=3)
    assert got["status"] == "pass" and float(got["error"]) <= MODEL_TOLERANCE[torch.bfloat16] / 3, got
    assert got["message"].startswith("1 near-tie routing choice(s) taken the backend's way"), got
