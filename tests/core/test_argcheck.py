"""accel_models.argcheck: every backend rejects the same bad input with the same ValueError."""

from __future__ import annotations

import pytest
import torch

import accel_backend_cuda
import accel_backend_gcu
import accel_backend_npu
import accel_backend_reference
from accel_models import argcheck

BACKENDS = [accel_backend_reference, accel_backend_gcu, accel_backend_npu, accel_backend_cuda]


@pytest.fixture(autouse=True)
def _cpu_tensors_reach_the_cuda_checks(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the cuda backend's device check lets CPU tensors through


def _topk(**kw):
    args = dict(router_logits=torch.randn(3, 8), top_k=2, scoring_func="softmax", renormalize=True,
                num_expert_group=None, topk_group=None, e_score_correction_bias=None, routed_scaling_factor=1.0)
    return {**args, **kw}


def _experts(**kw):
    args = dict(hidden_states=torch.randn(3, 8), w13=torch.randn(2, 6, 8), w2=torch.randn(2, 8, 3),
                topk_weights=torch.rand(3, 1), topk_ids=torch.zeros(3, 1, dtype=torch.int32), activation="silu",
                expert_map=None)
    return {**args, **kw}


def _mm(**kw):
    args = dict(a=torch.zeros(2, 8, dtype=torch.int8), b=torch.zeros(4, 8, dtype=torch.int8),
                scale_a=torch.ones(2, 1), scale_b=torch.ones(4), out_dtype=torch.float16, bias=None)
    return {**args, **kw}


CASES = [
    ("accel_rms_norm", dict(x=torch.ones(2, 8), weight=torch.ones(4), eps=1e-6), "weight has shape"),
    ("accel_rms_norm", dict(x=torch.ones(2, 8, dtype=torch.int32), weight=torch.ones(8), eps=1e-6),
     r"x has dtype torch.int32; the \w+ backend supports float32, float16, bfloat16"),
    ("accel_silu_and_mul", dict(x=torch.ones(2, 7)), "x's last dimension must be even"),
    ("accel_gelu_and_mul", dict(x=torch.ones(2, 8), approximate="fast"), "approximate must be 'none' or 'tanh'"),
    ("accel_rotary_embedding", dict(positions=torch.zeros(4, dtype=torch.int32), query=torch.randn(4, 16), key=None,
                                    cos_sin_cache=torch.randn(8, 16), head_size=16, rotary_dim=16, is_neox=True),
     "positions must be a 1-D torch.int64 tensor"),
    ("accel_rotary_embedding", dict(positions=torch.zeros(4, dtype=torch.int64), query=torch.randn(4, 20), key=None,
                                    cos_sin_cache=torch.randn(8, 16), head_size=16, rotary_dim=16, is_neox=True),
     r"query has shape \(4, 20\); expected \[4, heads \* 16\]"),
    ("accel_moe_topk", _topk(top_k=9), r"top_k must be in \[1, num_experts=8\]"),
    ("accel_moe_topk", _topk(scoring_func="relu"), "scoring_func must be 'softmax' or 'sigmoid'"),
    ("accel_moe_topk", _topk(num_expert_group=3, topk_group=1), "grouped top-k needs num_experts"),
    ("accel_moe_topk", _topk(top_k=5, num_expert_group=4, topk_group=2), "top_k=5 exceeds the 4 experts"),
    ("accel_moe_topk", _topk(e_score_correction_bias=torch.zeros(7)), "e_score_correction_bias must be"),
    ("accel_fused_experts", _experts(activation="relu"), "activation must be 'silu' or 'gelu'"),
    ("accel_fused_experts", _experts(w2=torch.randn(2, 8, 4)), "do not fit hidden_states"),
    ("accel_fused_experts", _experts(w13=torch.randn(2, 6, 8, dtype=torch.float16)),
     "w13 must be a 3-D tensor of hidden_states' dtype"),
    ("accel_fused_experts", _experts(topk_ids=torch.zeros(3, 1, dtype=torch.int64)),
     "topk_ids must be a 2-D torch.int32 tensor"),
    ("accel_dynamic_int8_quant", dict(x=torch.randn(2, 3, 4)), "x must be 2-D"),
    ("accel_int8_scaled_mm", _mm(b=torch.zeros(4, 7, dtype=torch.int8)), r"b must be \[n, k=8\]"),
    ("accel_int8_scaled_mm", _mm(scale_b=torch.ones(3)), r"scale_a must be \[2, 1\] and scale_b \[4\]"),
    ("accel_int8_scaled_mm", _mm(a=torch.zeros(2, 8)), "a and b must be 2-D int8 tensors"),
]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda m: m.NAME)
@pytest.mark.parametrize(("op", "kwargs", "match"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_backend_rejects_the_same_bad_input_alike(backend, op, kwargs, match):
    if backend is accel_backend_reference and "the \\w+ backend supports" in match:
        match = "x has dtype torch.int32; supported: float32, float16, bfloat16, float64"
    with pytest.raises(ValueError, match=match):
        getattr(backend, op)(**kwargs)


def test_paged_attention_index_checks_are_shared():
    query = torch.randn(3, 4, 8)
    ok = dict(block_table=torch.zeros(2, 4, dtype=torch.int32), seq_lens=torch.ones(2, dtype=torch.int32),
              query_start_loc=torch.tensor([0, 1, 3], dtype=torch.int32))
    assert argcheck.check_paged_attention(query, **ok, num_kv_heads=2, head_size=8) == 2
    with pytest.raises(ValueError, match="heads must be a multiple of KV heads"):
        argcheck.check_paged_attention(query, **ok, num_kv_heads=3, head_size=8)
    with pytest.raises(ValueError, match=r"query_start_loc must be \[B\+1\]"):
        argcheck.check_paged_attention(query, **{**ok, "seq_lens": torch.ones(3, dtype=torch.int32)},
                                       num_kv_heads=2, head_size=8)
    with pytest.raises(ValueError, match="block_table must be a 2-D torch.int32 tensor, got torch.int64"):
        argcheck.check_paged_attention(query, **{**ok, "block_table": torch.zeros(2, 4, dtype=torch.int64)},
                                       num_kv_heads=2, head_size=8)


def test_write_kv_cache_and_allocation_checks():
    key = torch.randn(3, 2, 8)
    argcheck.check_write_kv_cache(key, key, torch.zeros(3, dtype=torch.int64), 2, 8)
    with pytest.raises(ValueError, match=r"value has shape \(3, 2, 4\); expected \(3, 2, 8\)"):
        argcheck.check_write_kv_cache(key, torch.randn(3, 2, 4), torch.zeros(3, dtype=torch.int64), 2, 8)
    with pytest.raises(ValueError, match=r"block_size 8 is not supported by the x backend; supported: \(16, 32\)"):
        argcheck.check_allocate_kv_cache(4, 8, (16, 32), "x")
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        argcheck.check_allocate_kv_cache(0, 16, (16, 32), "x")
    with pytest.raises(ValueError, match="out_dtype torch.int8 is not supported; supported: float32"):
        argcheck.check_dtype("out_dtype", torch.int8)
