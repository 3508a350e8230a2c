"""The CUDA backend's Triton kernels run through Triton's interpreter on CPU tensors, in float32.

This checks the kernels' indexing and math in CI, without a GPU, against the reference backend run in
float64 (an independent, vectorized torch implementation, itself checked against naive loops in
tests/reference). Float32, except the dot-free rotary + KV-write kernel (also bfloat16): the interpreter's
bfloat16 dot is wrong (numpy has no bfloat16), so the bfloat16 paths are verified on the H100 by
bench/cuda/run_all.py (and the fused ops by bench/cuda/check_fused.py). Shapes are small and odd: the
interpreter runs each program in Python.

TRITON_INTERPRET must be set before Triton is first imported (its own library functions are decorated
then), so this module runs in a subprocess started by test_cuda_host.py::test_kernels_in_the_interpreter;
in the main session it skips.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in a subprocess with TRITON_INTERPRET=1 (test_cuda_host.py::test_kernels_in_the_interpreter)",
                allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("the CUDA backend's kernels need Triton (its interpreter runs them on CPU)", allow_module_level=True)

import accel_backend_cuda as C  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from accel_backend_cuda._triton_kernels import _o_proj_by_group, _weight_rows  # noqa: E402
import accel_backend_reference as R  # noqa: E402

F64 = torch.float64
MOD = "accel_backend_cuda._triton_kernels"


@pytest.fixture(scope="module", autouse=True)
def kernels():
    C._num_sms.cache_clear()
    kern = importlib.import_module(MOD)
    assert kern.INTERPRET
    return kern


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.to(F64) - ref).norm() / ref.norm())


def test_rms_norm_and_fused_add_on_strided_rows():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(5, 3, 2 * 37, generator=g)
    x = wide[..., ::2]  # a strided view: [5, 3, 37]
    w = torch.randn(37, generator=g)
    assert rel(C.accel_rms_norm(x=x, weight=w, eps=1e-5), R.accel_rms_norm(x=x.to(F64), weight=w.to(F64), eps=1e-5)) < 1e-6
    res = torch.randn(5, 3, 37, generator=g)
    out, res_out = C.accel_fused_add_rms_norm(x=x, residual=res, weight=w, eps=1e-5)
    e_out, e_res = R.accel_fused_add_rms_norm(x=x.to(F64), residual=res.to(F64), weight=w.to(F64), eps=1e-5)
    assert out.shape == x.shape and rel(out, e_out) < 1e-6 and rel(res_out, e_res) < 1e-6
    assert torch.equal(x, wide[..., ::2])  # the input is not modified


def test_gated_activations():
    x = torch.randn(3, 2, 2 * 45, generator=torch.Generator().manual_seed(1)) * 3
    assert rel(C.accel_silu_and_mul(x=x), R.accel_silu_and_mul(x=x.to(F64))) < 1e-6
    for approximate in ("none", "tanh"):
        got = C.accel_gelu_and_mul(x=x, approximate=approximate)
        assert rel(got, R.accel_gelu_and_mul(x=x.to(F64), approximate=approximate)) < 1e-6


@pytest.mark.parametrize("is_neox, rotary_dim", [(True, 24), (False, 24), (True, 10), (False, 6)])
def test_rotary_partial_and_both_styles(is_neox, rotary_dim):
    g = torch.Generator().manual_seed(rotary_dim)
    tokens, heads, kv_heads, head_size = 6, 3, 1, 24
    pos = torch.randint(0, 40, (tokens,), generator=g)
    cache = torch.randn(40, rotary_dim, generator=g)
    q = torch.randn(tokens, heads * head_size, generator=g)
    k = torch.randn(tokens, kv_heads, head_size, generator=g)
    eq, ek = R.accel_rotary_embedding(positions=pos, query=q.to(F64), key=k.to(F64), cos_sin_cache=cache.to(F64),
                                      head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox)
    cq, ck = C.accel_rotary_embedding(positions=pos, query=q.clone(), key=k.clone(), cos_sin_cache=cache,
                                      head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox)
    assert cq.shape == q.shape and ck.shape == k.shape
    assert rel(cq, eq) < 1e-6 and rel(ck, ek) < 1e-6


def _attention(q_lens, seq_lens, heads, kv_heads, head_size, block_size, window=None, cap=None, seed=0,
               plan_len=None):
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(s / block_size) for s in seq_lens]
    total = sum(blocks) + 2
    perm = torch.randperm(total, generator=g)
    width = max(max(blocks) + 1, math.ceil((plan_len or 0) / block_size))  # a graph's table: the widest
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    i = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[i : i + n]
        i += n
    slots = torch.cat([table[b, torch.arange(s) // block_size].long() * block_size + torch.arange(s) % block_size
                       for b, s in enumerate(seq_lens)])
    n = sum(seq_lens)
    k = torch.randn(n, kv_heads, head_size, generator=g)
    v = torch.randn(n, kv_heads, head_size, generator=g)
    ours = C.accel_allocate_kv_cache(num_blocks=total, block_size=block_size, num_kv_heads=kv_heads,
                                     head_size=head_size, dtype=torch.float32, device="cpu")
    ours.fill_(float("nan"))  # attention must never read a slot nothing wrote
    ref = R.accel_allocate_kv_cache(num_blocks=total, block_size=block_size, num_kv_heads=kv_heads,
                                    head_size=head_size, dtype=F64, device="cpu")
    # padding tokens (slot -1) are skipped
    pad = torch.full((2,), -1, dtype=torch.int64)
    C.accel_write_kv_cache(key=torch.cat([k, k[:2]]), value=torch.cat([v, v[:2]]), kv_cache=ours,
                           slot_mapping=torch.cat([slots, pad]))
    R.accel_write_kv_cache(key=k.to(F64), value=v.to(F64), kv_cache=ref, slot_mapping=slots)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), heads, head_size, generator=g)
    meta = dict(block_table=table, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=qsl,
                max_query_len=max(q_lens), max_seq_len=plan_len or max(seq_lens), scale=head_size**-0.5,
                sliding_window=window, logits_soft_cap=cap)
    got = C.accel_paged_attention(query=q, kv_cache=ours, **meta)
    exp = R.accel_paged_attention(query=q.to(F64), kv_cache=ref, **meta)
    return got, exp


@pytest.mark.parametrize(
    "case",
    [
        dict(q_lens=[1, 1, 1], seq_lens=[5, 40, 17], heads=4, kv_heads=2, head_size=32, block_size=16),
        dict(q_lens=[3, 1, 20], seq_lens=[3, 40, 33], heads=6, kv_heads=2, head_size=24, block_size=16, window=9,
             cap=5.0),
        dict(q_lens=[5, 1], seq_lens=[9, 70], heads=7, kv_heads=1, head_size=16, block_size=32),
        dict(q_lens=[1, 1], seq_lens=[300, 270], heads=4, kv_heads=1, head_size=16, block_size=64),  # split-K
        dict(q_lens=[1], seq_lens=[150], heads=4, kv_heads=1, head_size=16, block_size=16),  # short-context split
        # planned for a far longer context (as a captured graph is): most splits empty, the merge reads the
        # active ones; one sequence shorter than a key tile, one with a partial last split
        dict(q_lens=[1, 1, 1], seq_lens=[150, 7, 420], heads=4, kv_heads=1, head_size=16, block_size=16,
             plan_len=4000),
    ],
    ids=["decode-gqa", "mixed-window-cap", "group7-chunked", "long-decode-split", "short-decode-split",
         "graph-plan-split"],
)
@pytest.mark.parametrize("fused_merge, prefetch", [(True, True), (False, True), (True, False)],
                         ids=["merge-in-kernel", "merge-kernel", "no-prefetch"])
def test_paged_attention(case, fused_merge, prefetch, kernels, monkeypatch):
    # prefetch: every decode-like case on the hand-pipelined key loop, split or not, or none on it
    monkeypatch.setattr(kernels, "FUSED_MERGE", fused_merge)
    knobs = {"prefetch_below": 1e9, "prefetch_splits": 1} if prefetch else {"prefetch_below": 0}
    monkeypatch.setitem(kernels.CONFIG, "attn_decode", {**kernels.CONFIG["attn_decode"], **knobs})
    got, exp = _attention(**case)
    assert got.shape == exp.shape and torch.isfinite(got).all()
    assert rel(got, exp) < 2e-6
    # the in-kernel merge leaves its arrival counters at zero for the next launch
    assert all(int(c.abs().sum()) == 0 for c in kernels._COUNTERS.values())


@pytest.mark.parametrize("seq_lens, plan_len", [([300, 270], None), ([150], None), ([150, 7, 420], 4000)])
def test_decode_cases_are_split(seq_lens, plan_len, kernels):
    plan = C.attention_plan(num_tokens=len(seq_lens), num_seqs=len(seq_lens), num_heads=4, num_kv_heads=1,
                            head_size=16, max_query_len=1, max_seq_len=plan_len or max(seq_lens),
                            num_sms=C._num_sms(torch.device("cpu")), config=kernels.CONFIG)
    assert plan.num_splits > 1  # so the cases above exercise the split-K paths and both merges
    if plan_len:  # the graph-like plan: a sequence with empty splits, one with several tiles per split
        tiles = [-(-s // plan.tile_n) for s in seq_lens]
        assert min(tiles) < plan.num_splits < max(tiles) and max(tiles) % plan.num_splits, (tiles, plan)


@pytest.mark.parametrize("m, n, k, bias, split_k, dot", [
    (1, 37, 70, False, 1, 1), (3, 40, 130, True, 3, 1), (7, 33, 300, True, 4, 0), (16, 64, 96, False, 2, 1),
    (12, 5, 257, True, 1, 0)])
def test_linear_small_m(m, n, k, bias, split_k, dot, kernels):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k + 3, generator=g)[:, :k]  # rows with a stride > k
    b = torch.randn(n, generator=g) if bias else None
    cfg = dict(BLOCK_M=16 if dot else C._pow2(m), BLOCK_N=16, BLOCK_K=32, SPLIT_K=split_k, USE_DOT=dot,
               num_warps=4, num_stages=2)
    got = kernels.linear_small_m(x, w, b, cfg)
    exp = x.to(F64) @ w.to(F64).T + (b.to(F64) if bias else 0)
    assert got.shape == (m, n) and rel(got, exp) < 1e-6
    assert all(int(c.abs().sum()) == 0 for c in kernels._COUNTERS.values())


def test_linear_split_without_counters_reduces_in_a_second_kernel(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "COUNTER_SLOTS", 0)  # as when no counter buffer can be had
    monkeypatch.setattr(kernels, "_COUNTERS", {})
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(2, 300, generator=g), torch.randn(50, 300, generator=g), torch.randn(50, generator=g)
    got = kernels.linear_small_m(x, w, b, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=4, USE_DOT=1,
                                                num_warps=4, num_stages=2))
    assert rel(got, x.to(F64) @ w.to(F64).T + b.to(F64)) < 1e-6


def test_linear_hook_uses_the_small_m_kernel(kernels, monkeypatch):
    small = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    monkeypatch.setitem(kernels.CONFIG, "linear", {**C.LINEAR_CONFIG, "min_bytes": 0, "min_k": 32, "small": small,
                                                   "large": small})
    calls = []
    real = kernels.linear_small_m
    monkeypatch.setattr(kernels, "linear_small_m", lambda *a: calls.append(a[3]) or real(*a))
    g = torch.Generator().manual_seed(8)
    w = torch.randn(24, 96, generator=g)
    prepared = C.accel_prepare_linear(weight=w)
    for lead in [(1,), (2, 3), (17,)]:  # 17 rows: above max_m, torch
        x = torch.randn(*lead, 96, generator=g)
        got = C.accel_linear(x=x, weight=w, bias=None, prepared=prepared)
        assert got.shape == (*lead, 24) and rel(got, x.to(F64) @ w.to(F64).T) < 1e-6
    assert len(calls) == 2 and calls[0]["SPLIT_K"] > 1  # 2 row tiles on 4 "SMs": k is split


@pytest.mark.parametrize("path", ["decode", "sorted"])
@pytest.mark.parametrize("activation, ep", [("silu", False), ("gelu", True)])
def test_fused_experts(activation, ep, path, kernels, monkeypatch):
    if path == "sorted":  # the grouped GEMM over sorted pairs (above the decode path's max_pairs)
        monkeypatch.setitem(kernels.CONFIG, "moe_decode", {**C.MOE_DECODE_CONFIG, "max_pairs": 0})
    g = torch.Generator().manual_seed(3)
    tokens, experts, hidden, inter, top_k = 9, 5, 24, 20, 2
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / 5
    w2 = torch.randn(experts, hidden, inter, generator=g) / 5
    logits = torch.randn(tokens, experts, generator=g)
    kw = dict(top_k=top_k, scoring_func="softmax", renormalize=True, num_expert_group=None, topk_group=None,
              e_score_correction_bias=None, routed_scaling_factor=1.0)
    tw, ti = C.accel_moe_topk(router_logits=logits, **kw)
    rw, ri = R.accel_moe_topk(router_logits=logits.to(F64), **kw)
    assert torch.equal(ti, ri) and rel(tw, rw) < 1e-6
    emap = torch.tensor([0, -1, 1, 2, -1], dtype=torch.int32) if ep else None
    local = 3 if ep else experts
    got = C.accel_fused_experts(hidden_states=x, w13=w13[:local], w2=w2[:local], topk_weights=tw, topk_ids=ti,
                                activation=activation, expert_map=emap)
    exp = R.accel_fused_experts(hidden_states=x.to(F64), w13=w13[:local].to(F64), w2=w2[:local].to(F64),
                                topk_weights=tw, topk_ids=ti, activation=activation, expert_map=emap)
    assert rel(got, exp) < 2e-6


def _moe_case(tokens, experts, local, top_k, hidden, inter, seed):
    """Random fused_experts inputs; ``local`` experts (of ``experts``) held here through an expert_map with
    -1 for the others (None: all local, no map)."""
    g = torch.Generator().manual_seed(seed)
    nl = local or experts
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(nl, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(nl, hidden, inter, generator=g) / inter**0.5
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).to(torch.int32)
    w = torch.rand(tokens, top_k, generator=g) + 0.1
    emap = None
    if local:
        emap = torch.full((experts,), -1, dtype=torch.int32)
        emap[torch.randperm(experts, generator=g)[:local]] = torch.arange(local, dtype=torch.int32)
    return dict(hidden_states=x, w13=w13, w2=w2, topk_weights=w / w.sum(-1, keepdim=True), topk_ids=ids,
                expert_map=emap)


@pytest.mark.parametrize("tokens, experts, local, top_k, hidden, inter, act, slots, rows", [
    (1, 8, None, 2, 70, 40, "silu", "pairs", 16),     # one token: a slot per pair, each the first of its expert
    (3, 8, 5, 3, 70, 40, "gelu", "experts", 16),      # 9 pairs >= 5 local experts: a slot per expert; -1 experts
    (2, 12, 6, 2, 33, 17, "silu", "pairs", 16),       # odd tiles; some pairs held elsewhere
    (12, 4, None, 2, 40, 24, "silu", "experts", None),  # 24 pairs in one masked 32-row tile, shared experts
    (12, 4, None, 2, 40, 24, "silu", "experts", 16),  # the same pairs through compact 16-row tiles
    (40, 3, None, 2, 36, 20, "silu", "experts", 16),  # ~27 pairs an expert: two or three chunks each
    (30, 4, 3, 3, 33, 17, "gelu", "experts", 16),     # ~22 pairs an expert: chunks, a -1 expert, ragged ends
])
def test_fused_experts_decode_path(tokens, experts, local, top_k, hidden, inter, act, slots, rows, kernels,
                                   monkeypatch):
    case = _moe_case(tokens, experts, local, top_k, hidden, inter, seed=tokens * 31 + experts)
    plans = []
    real = kernels.fused_experts_decode
    monkeypatch.setattr(kernels, "fused_experts_decode", lambda *a: plans.append(a[-1]) or real(*a))
    # small tiles so several n tiles and k steps run (the defaults would cover these shapes in one)
    tiles = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    monkeypatch.setitem(kernels.CONFIG, "moe_decode", {"max_pairs": 128, "rows": rows, "up": tiles, "down": tiles})
    got = C.accel_fused_experts(activation=act, **case)
    f64 = {k: (v.to(F64) if k in ("hidden_states", "w13", "w2") else v) for k, v in case.items()}
    exp = R.accel_fused_experts(activation=act, **f64)
    assert len(plans) == 1 and plans[0]["BY_EXPERT"] == (slots == "experts")
    if rows is None:  # one masked tile of all the launch's pairs
        assert plans[0]["BLOCK_R"] == plans[0]["BLOCK_M"]
    elif tokens * top_k > 32:  # the compact tile is narrower than some expert's pairs: a chunk loop ran
        assert plans[0]["BLOCK_R"] < torch.bincount(case["topk_ids"].flatten().long()).max(), plans[0]
    assert got.shape == exp.shape and rel(got, exp) < 2e-6
    assert all(int(c.abs().sum()) == 0 for c in kernels._COUNTERS.values())  # counters zeroed for the next call


def test_fused_experts_decode_path_without_counters_sums_in_a_second_kernel(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "COUNTER_SLOTS", 0)  # as on a first call inside a graph capture
    monkeypatch.setattr(kernels, "_COUNTERS", {})
    case = _moe_case(3, 6, 4, 2, 48, 24, seed=5)
    got = C.accel_fused_experts(activation="silu", **case)
    f64 = {k: (v.to(F64) if k in ("hidden_states", "w13", "w2") else v) for k, v in case.items()}
    assert rel(got, R.accel_fused_experts(activation="silu", **f64)) < 2e-6


def test_int8_quant_and_matmul():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 33, generator=g)
    x[2] = 0  # an all-zero row: scale 0, q 0
    q, s = C.accel_dynamic_int8_quant(x=x)
    eq, es = R.accel_dynamic_int8_quant(x=x)
    assert q.dtype == torch.int8 and s.shape == (6, 1)
    assert (q.int() - eq.int()).abs().max() <= 1 and torch.allclose(s, es, rtol=1e-7, atol=0)
    assert q[2].abs().sum() == 0 and s[2, 0] == 0
    b = torch.randint(-127, 128, (10, 33), generator=g, dtype=torch.int8)
    sb = torch.rand(10, generator=g)
    bias = torch.randn(10, generator=g)
    got = C.accel_int8_scaled_mm(a=q, b=b, scale_a=s, scale_b=sb, out_dtype=torch.float32, bias=bias)
    exp = (q.to(F64) @ b.to(F64).t()) * s.to(F64) * sb.to(F64) + bias.to(F64)
    assert rel(got, exp) < 1e-6


@pytest.mark.parametrize(("tokens", "experts", "top_k", "scoring", "renorm", "bias", "scale"), [
    (5, 8, 2, "softmax", True, False, 1.0),     # Mixtral
    (3, 60, 4, "softmax", False, False, 1.0),   # Qwen2-MoE
    (4, 128, 8, "softmax", True, False, 1.0),   # Qwen3-MoE
    (2, 37, 3, "sigmoid", True, True, 2.5),     # sigmoid with a correction bias and routed scaling
    (0, 8, 2, "softmax", True, False, 1.0),     # an empty batch
])
def test_moe_topk_kernel_matches_the_reference(tokens, experts, top_k, scoring, renorm, bias, scale):
    g = torch.Generator().manual_seed(experts)
    logits = torch.randn(tokens, experts, generator=g)
    corr = torch.randn(experts, generator=g) * 0.1 if bias else None
    kw = dict(top_k=top_k, scoring_func=scoring, renormalize=renorm, num_expert_group=None, topk_group=None,
              routed_scaling_factor=scale)
    w, ids = C.accel_moe_topk(router_logits=logits, e_score_correction_bias=corr, **kw)
    ew, eids = R.accel_moe_topk(router_logits=logits.to(F64), e_score_correction_bias=None if corr is None else corr.to(F64), **kw)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (tokens, top_k)
    assert torch.equal(ids, eids)
    if tokens:
        assert rel(w, ew) < 1e-6


def test_moe_topk_kernel_breaks_ties_toward_the_lower_expert_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, 2.0]])  # experts 1, 2 and 4 tie for first
    kw = dict(top_k=3, scoring_func="softmax", renormalize=False, num_expert_group=None, topk_group=None,
              e_score_correction_bias=None, routed_scaling_factor=1.0)
    _, ids = C.accel_moe_topk(router_logits=logits, **kw)
    assert ids.tolist() == [[1, 2, 4]]
    _, ids = C.accel_moe_topk(router_logits=torch.flip(logits, dims=[1]), **kw)  # now experts 1, 3 and 4
    assert ids.tolist() == [[1, 3, 4]]
    strided = torch.tensor([[1.0, 0.0, 3.0, 0.0, 3.0, 0.0]])[:, ::2]  # a non-unit last stride
    _, ids = C.accel_moe_topk(router_logits=strided, **{**kw, "top_k": 2})
    assert ids.tolist() == [[1, 2]]


def test_moe_topk_grouped_routing_matches_the_float64_reference():
    """DeepSeek-style grouped top-k with a correction bias (the path outside the one-launch kernel)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 64, generator=g)
    corr = torch.randn(64, generator=g) * 0.1
    kw = dict(top_k=6, scoring_func="sigmoid", renormalize=True, num_expert_group=8, topk_group=3,
              routed_scaling_factor=2.5)
    w, ids = C.accel_moe_topk(router_logits=logits, e_score_correction_bias=corr, **kw)
    ew, eids = R.accel_moe_topk(router_logits=logits.to(F64), e_score_correction_bias=corr.to(F64), **kw)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, eids) and rel(w, ew) < 1e-6


# ----------------------------------------------------------------------------------------------------
# rotary in one launch, rope + KV write fused (API 1.3), act_and_mul fused into the small-M linear
# ----------------------------------------------------------------------------------------------------


class _Launches:
    """Stands in for a @triton.jit kernel: counts ``kernel[grid](...)`` launches, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _rope64(x, pos, cos_sin, rotary_dim, is_neox, dtype):
    """Independent float64 rotary of x [T, heads, D]; cos/sin rounded to the dtype first (the contract), and
    for bfloat16 each product rounded to it too (the eager formula the kernel follows)."""
    rnd = (lambda t: t.to(dtype).to(F64)) if dtype != torch.float32 else (lambda t: t)
    half = rotary_dim // 2
    cs = cos_sin.to(dtype).to(F64)[pos][:, None, :]  # [T, 1, rotary_dim]
    c, s = cs[..., :half], cs[..., half:]
    x = x.to(F64)
    out = x.clone()
    i1 = torch.arange(half) if is_neox else torch.arange(half) * 2
    i2 = i1 + half if is_neox else i1 + 1
    x1, x2 = x[..., i1], x[..., i2]
    out[..., i1] = rnd(x1 * c) - rnd(x2 * s)
    out[..., i2] = rnd(x2 * c) + rnd(x1 * s)
    return out


def _rope_inputs(tokens, heads, kv_heads, head_size, rotary_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, generator=g).to(dtype)
    q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
    pos = torch.randint(0, 50, (tokens,), generator=g)
    cos_sin = torch.randn(50, rotary_dim, generator=g)  # float32, as get_rope builds it
    return qkv, q.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size), \
        v.view(tokens, kv_heads, head_size), pos, cos_sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("is_neox, rotary_dim, chunk", [(True, 24, None), (False, 24, 2), (True, 10, 4),
                                                        (False, 6, None)])
def test_rope_and_write_kv_cache_one_launch(is_neox, rotary_dim, chunk, dtype, kernels, monkeypatch):
    """Strided q/k/v (views of one qkv buffer), GQA, padding slots, partial rotary, both styles; ``chunk``
    forces several head chunks per token for q and for k. Every cache slot nothing wrote stays NaN."""
    if chunk:
        monkeypatch.setattr(kernels, "_heads_per_program", lambda n, half_pad: chunk)
    launches = _Launches(kernels._rope_kernel)
    monkeypatch.setattr(kernels, "_rope_kernel", launches)
    tokens, heads, kv_heads, head_size, block_size, blocks = 7, 6, 3, 24, 16, 3
    qkv, q, k, v, pos, cos_sin = _rope_inputs(tokens, heads, kv_heads, head_size, rotary_dim, dtype, seed=rotary_dim)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    slots = torch.tensor([5, -1, 17, 40, 0, -1, 33])
    cache = C.accel_allocate_kv_cache(num_blocks=blocks, block_size=block_size, num_kv_heads=kv_heads,
                                      head_size=head_size, dtype=dtype, device="cpu")
    cache.fill_(float("nan"))
    qo, ko = C.accel_rope_and_write_kv_cache(positions=pos, query=q, key=k, value=v, cos_sin_cache=cos_sin,
                                             head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox,
                                             kv_cache=cache, slot_mapping=slots)
    assert len(launches.grids) == 1  # q, k and the cache write in one launch
    eq, ek = (_rope64(x, pos, cos_sin, rotary_dim, is_neox, dtype) for x in (q0, k0))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert qo.shape == q.shape and ko.shape == k.shape and qo.data_ptr() == q.data_ptr()  # in place on the views
    assert rel(qo, eq) < tol and rel(ko, ek) < tol
    assert torch.equal(v, v0)
    written = torch.zeros(2, blocks, kv_heads, block_size, dtype=torch.bool)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        b, off = divmod(slot, block_size)
        assert torch.equal(cache[0, b, :, off], ko[t]) and torch.equal(cache[1, b, :, off], v0[t]), t
        written[:, b, :, off] = True
    assert torch.isnan(cache[~written]).all()  # padding tokens (slot -1) wrote nothing, anywhere


@pytest.mark.parametrize("with_key", [True, False])
def test_rotary_rotates_q_and_k_in_one_launch(with_key, kernels, monkeypatch):
    monkeypatch.setattr(kernels, "_heads_per_program", lambda n, half_pad: 2)  # 2 q chunks + 2 k chunks
    launches = _Launches(kernels._rope_kernel)
    monkeypatch.setattr(kernels, "_rope_kernel", launches)
    _, q, k, _, pos, cos_sin = _rope_inputs(5, 4, 3, 16, 16, torch.float32, seed=11)
    q2 = q.reshape(5, 64)  # 2-D query: [T, heads * head_size] (a copy: the view's rows are strided)
    eq, ek = _rope64(q2.view(5, 4, 16), pos, cos_sin, 16, False, torch.float32), _rope64(k, pos, cos_sin, 16, False,
                                                                                        torch.float32)
    qo, ko = C.accel_rotary_embedding(positions=pos, query=q2, key=k.clone() if with_key else None,
                                      cos_sin_cache=cos_sin, head_size=16, rotary_dim=16, is_neox=False)
    assert len(launches.grids) == 1 and launches.grids[0][1] == (4 if with_key else 2)
    assert qo.shape == (5, 64) and rel(qo.view(5, 4, 16), eq) < 1e-6
    assert (ko is None) if not with_key else rel(ko, ek) < 1e-6


def _act64(x, activation):
    g, u = x.to(F64).chunk(2, dim=-1)
    if activation == "silu":
        a = g / (1 + torch.exp(-g))
    elif activation == "gelu":
        a = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    else:
        a = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    return a * u


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("m, n, k, split_k, dot, bias", [(1, 37, 70, 1, 1, False), (3, 40, 130, 3, 1, True),
                                                         (7, 33, 300, 4, 0, True), (16, 20, 96, 2, 1, False)])
def test_linear_small_m_with_the_activation_at_its_x_loads(activation, m, n, k, split_k, dot, bias, kernels):
    g = torch.Generator().manual_seed(m * 100 + k)
    x = torch.randn(m, 2 * k + 5, generator=g)[:, 5:] * 2  # rows with a stride > 2k
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    cfg = dict(BLOCK_M=16 if dot else C._pow2(m), BLOCK_N=16, BLOCK_K=32, SPLIT_K=split_k, USE_DOT=dot,
               num_warps=4, num_stages=2)
    act = {"silu": 0, "gelu": 1, "gelu_tanh": 2}[activation]
    got = kernels.linear_small_m(x, w, b, cfg, act)
    exp = _act64(x, activation) @ w.to(F64).T + (b.to(F64) if bias else 0)
    assert got.shape == (m, n) and rel(got, exp) < 2e-6
    assert all(int(c.abs().sum()) == 0 for c in kernels._COUNTERS.values())


def test_linear_hook_takes_the_wide_tile_for_rows_above_max_m_where_configured(kernels, monkeypatch):
    """linear with the wide entry (17-64 rows of a weight in its byte range): the small-M kernel with a 32- or
    64-row dot tile and split-K, against float64; outside the range (or without the entry) torch's linear."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 300, generator=g) / 300**0.5
    monkeypatch.setitem(kernels.CONFIG, "linear", {"wide": dict(C.WIDE_DOWN, min_bytes=0, max_bytes=1 << 20,
                                                                BLOCK_N=16, BLOCK_K=32, SPLIT_K=3)})
    launches = []
    real = kernels.linear_small_m
    monkeypatch.setattr(kernels, "linear_small_m", lambda *a, **kw: launches.append(a[3]) or real(*a, **kw))
    for m in (17, 40, 64):
        x = torch.randn(m, 300, generator=g)
        got = C.accel_linear(x=x, weight=w, bias=None, prepared=None)
        assert launches[-1]["BLOCK_M"] == (32 if m <= 32 else 64) and launches[-1]["SPLIT_K"] == 3
        assert rel(got, x.to(F64) @ w.to(F64).T) < 2e-6, m
    launches.clear()
    C.accel_linear(x=torch.randn(65, 300, generator=g), weight=w, bias=None, prepared=None)
    assert not launches  # more rows than the wide max_m: torch's linear
    assert all(int(c.abs().sum()) == 0 for c in kernels._COUNTERS.values())


def test_act_and_mul_linear_hook_fuses_decode_rows_and_matches_the_composite_elsewhere(kernels, monkeypatch):
    small = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    monkeypatch.setitem(kernels.CONFIG, "linear", {**C.LINEAR_CONFIG, "min_bytes": 0, "min_k": 32, "small": small,
                                                   "large": small})
    monkeypatch.setattr(C, "ACT_LINEAR_MIN_BYTES", None)  # the fused path (off by default: slower on the H100)
    fused, launches = [], _Launches(kernels._act_and_mul_kernel)
    real = kernels.linear_small_m
    monkeypatch.setattr(kernels, "linear_small_m", lambda *a: fused.append(a[4] if len(a) > 4 else -1) or real(*a))
    monkeypatch.setattr(kernels, "_act_and_mul_kernel", launches)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(24, 96, generator=g) / 10
    b = torch.randn(24, generator=g)
    prepared = C.accel_prepare_linear(weight=w)
    for lead, activation in [((1,), "silu"), ((2, 3), "gelu_tanh"), ((17,), "gelu")]:  # 17 rows: act + F.linear
        wide = torch.randn(*lead, 2 * 192 + 1, generator=g)
        x = wide[..., 1::2][..., :192]  # a strided [..., 2k] view
        got = C.accel_act_and_mul_linear(x=x, weight=w, bias=b, prepared=prepared, activation=activation)
        exp = _act64(x, activation) @ w.to(F64).T + b.to(F64)
        assert got.shape == (*lead, 24) and rel(got, exp) < 2e-6
    assert fused == [0, 2]  # the two decode-sized calls took the fused kernel (silu, gelu tanh)...
    assert len(launches.grids) == 1  # ...only the 17-row call ran the separate activation kernel
    with pytest.raises(ValueError, match="activation"):
        C.accel_act_and_mul_linear(x=x, weight=w, bias=b, prepared=None, activation="relu")


def test_conformance_kit_passes_the_native_fused_ops(kernels, monkeypatch):
    """The kit's checks of both fused ops (API 1.3) on this backend's native kernels: strided q/k/v,
    padding slots, partial rotary, both styles; act_and_mul_linear forced onto the fused small-M kernel."""
    from accel_models.testing import run_conformance

    small = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    monkeypatch.setitem(kernels.CONFIG, "linear", {**C.LINEAR_CONFIG, "min_bytes": 0, "min_k": 32, "small": small,
                                                   "large": small})
    monkeypatch.setattr(C, "ACT_LINEAR_MIN_BYTES", None)  # the fused path (off by default: slower on the H100)
    fused = []
    real = kernels.linear_small_m
    monkeypatch.setattr(kernels, "linear_small_m", lambda *a: fused.append(len(a) > 4 and a[4] >= 0) or real(*a))
    report = run_conformance("cuda", ops=["rope_and_write_kv_cache", "act_and_mul_linear"], allow_unavailable=True,
                             device="cpu", quick=True, max_examples=6, dtypes=(torch.float32,))
    assert report.passed, [(r.op, r.status, r.message) for r in report.ops]
    assert all(r.native and r.cases > 0 for r in report.ops)
    assert any(fused)


# ----------------------------------------------------------------------------------------------------
# persistent decoder layer (one phase per launch in the interpreter)
# ----------------------------------------------------------------------------------------------------


def _decoder_layer_case(seed, n_old, has_res, is_neox, block_size=16, hidden=64, inter=96, heads=4, kv_heads=2,
                        head_size=32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    w = {"input_norm": 1 + 0.1 * r(hidden), "qkv": r((heads + 2 * kv_heads) * head_size, hidden, scale=hidden**-0.5),
         "o": r(hidden, heads * head_size, scale=(heads * head_size) ** -0.5), "post_norm": 1 + 0.1 * r(hidden),
         "gate_up": r(2 * inter, hidden, scale=hidden**-0.5), "down": r(hidden, inter, scale=inter**-0.5)}
    seq_len = n_old + 1
    num_blocks = 2 * (seq_len // block_size + 2)
    perm = torch.randperm(num_blocks, generator=g)
    table = perm[: -(-seq_len // block_size)].to(torch.int32)
    cache = torch.full((2, num_blocks, kv_heads, block_size, head_size), float("nan"))
    past_k, past_v = r(n_old, kv_heads, head_size), r(n_old, kv_heads, head_size)
    for p in range(n_old):
        cache[0, table[p // block_size], :, p % block_size] = past_k[p]
        cache[1, table[p // block_size], :, p % block_size] = past_v[p]
    slot = int(table[n_old // block_size]) * block_size + n_old % block_size
    pos = torch.tensor([n_old + 3])  # positions need not equal the cache index
    cs = r(n_old + 8, head_size)
    hid = r(1, hidden)
    res = r(1, hidden) if has_res else None
    return w, cache, table, slot, pos, cs, hid, res, past_k, past_v


def _decoder_layer_ref(w, hid, res, pos, cs, past_k, past_v, heads, kv_heads, head_size, is_neox, eps, scale):
    """The layer in float64 from the reference backend's ops (an independent implementation)."""
    w = {k: v.to(F64) for k, v in w.items()}
    hid = hid.to(F64)
    if res is None:
        resid, x = hid, R.accel_rms_norm(x=hid, weight=w["input_norm"], eps=eps)
    else:
        x, resid = R.accel_fused_add_rms_norm(x=hid, residual=res.to(F64), weight=w["input_norm"], eps=eps)
    qkv = x @ w["qkv"].T
    q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
    q, k = R.accel_rotary_embedding(positions=pos, query=q.clone(), key=k.clone(), cos_sin_cache=cs.to(F64),
                                    head_size=head_size, rotary_dim=head_size, is_neox=is_neox)
    keys = torch.cat([past_k.to(F64), k.view(1, kv_heads, head_size)])  # [S, kvh, D]
    vals = torch.cat([past_v.to(F64), v.view(1, kv_heads, head_size)])
    group = heads // kv_heads
    qh = q.view(heads, head_size)
    kk = keys.repeat_interleave(group, dim=1)  # [S, heads, D]
    vv = vals.repeat_interleave(group, dim=1)
    p = torch.softmax(torch.einsum("hd,shd->hs", qh, kk) * scale, dim=-1)
    att = torch.einsum("hs,shd->hd", p, vv).reshape(1, -1)
    o = att @ w["o"].T
    x2, resid2 = R.accel_fused_add_rms_norm(x=o, residual=resid, weight=w["post_norm"], eps=eps)
    gu = x2 @ w["gate_up"].T
    out = R.accel_silu_and_mul(x=gu) @ w["down"].T
    return out, resid2, k.view(kv_heads, head_size), v.view(kv_heads, head_size)


def _run_decoder_layer(kernels, overrides, w, cache, table, slot, pos, cs, hid, res, n_old, heads, kv_heads,
                       head_size, is_neox, eps):
    """decoder_layer_decode of a _decoder_layer_case under CONFIG["decoder_layer"] overrides (restored after)."""
    saved = dict(kernels.CONFIG["decoder_layer"])
    kernels.CONFIG["decoder_layer"].update(overrides)
    try:
        return C.decoder_layer_decode(
            hid, res, pos, w["input_norm"], w["qkv"], w["o"], w["post_norm"], w["gate_up"], w["down"], eps, cs,
            heads, kv_heads, head_size, is_neox, head_size**-0.5, cache, torch.tensor([slot]), table[None, :],
            torch.tensor([n_old + 1], dtype=torch.int32), max_seq_len=256)
    finally:
        kernels.CONFIG["decoder_layer"].clear()
        kernels.CONFIG["decoder_layer"].update(saved)


@pytest.mark.parametrize("seed, n_old, has_res, is_neox, tile_n, max_splits", [
    (0, 36, True, True, 32, 16),  # two splits over the cached keys, merged by the last to arrive
    (1, 0, False, True, 32, 16),  # first token: no cached key; layer 0 (no residual)
    (2, 50, True, False, 16, 1),  # GPT-J rotary, one split (direct store)
    (3, 100, True, True, 16, 16),  # more tiles than splits
])
@pytest.mark.parametrize("variant", [
    dict(DOT=2),  # every projection streamed
    dict(DOT=0),  # register tiles
    # one program: more attention items (2 KV heads, one split each) than programs, so the program's
    # second item loads its first key tile itself (the first item's is requested before the barrier)
    dict(DOT=0, programs=1),
    # two programs, each with more row tiles than its ring holds (tiles rotate through the ring), and the
    # split barrier (arrive, then the next phase's first loads, then wait: a no-op one phase a launch)
    dict(DOT=0, programs=2, DEPTH_QKV=3, DEPTH_DOWN=2, TN_DOWN=2),
    # o_proj by KV group behind ready flags (one group a pass one phase a launch), one row tile a program and
    # more row tiles than programs (the later tiles once every group is in)
    dict(DOT=0, FLAGS=1),
    dict(DOT=0, programs=2, TN_O=8, FLAGS=1),
], ids=["stream", "registers", "registers-1-program", "registers-ring", "flags", "flags-later-tiles"])
def test_decoder_layer_decode_matches_float64_layer(kernels, seed, n_old, has_res, is_neox, tile_n, max_splits, variant):
    heads, kv_heads, head_size, block_size, eps = 4, 2, 32, 16, 1e-5
    scale = head_size**-0.5
    w, cache, table, slot, pos, cs, hid, res, past_k, past_v = _decoder_layer_case(seed, n_old, has_res, is_neox)
    # stream: BK 32 < hidden 64, so the flattened (tile, k chunk) loop crosses tiles mid-way
    out, res_out = _run_decoder_layer(kernels, dict(TILE_N=tile_n, max_splits=max_splits, BK=32, **variant), w, cache,
                                      table, slot, pos, cs, hid, res, n_old, heads, kv_heads, head_size, is_neox, eps)
    e_out, e_res, e_k, e_v = _decoder_layer_ref(w, hid, res, pos, cs, past_k, past_v, heads, kv_heads, head_size,
                                                is_neox, eps, scale)
    assert out.shape == (1, 64) and res_out.shape == (1, 64)
    assert rel(out, e_out) < 1e-5 and rel(res_out, e_res) < 1e-6
    blk, off = divmod(slot, block_size)
    assert rel(cache[0, table[n_old // block_size], :, off], e_k) < 1e-6
    assert rel(cache[1, blk, :, off], e_v) < 1e-6
    # the cached keys before the slot are untouched
    for p in range(n_old):
        assert torch.equal(cache[0, table[p // block_size], :, p % block_size], past_k[p])


@triton.jit
def _o_proj_by_group_probe(w_ptr, att_ptr, flag_ptr, err_ptr, o_ptr, epoch, H, NQD: tl.constexpr, TN: tl.constexpr,
                           NQD_PAD: tl.constexpr, R3: tl.constexpr, NKV: tl.constexpr, GD: tl.constexpr):
    """A test kernel around _o_proj_by_group (polls on, 3 polls at most): one row tile a program."""
    pid = tl.program_id(0)
    w = _weight_rows(w_ptr, pid, H, NQD, TN, NQD_PAD, R3)
    _o_proj_by_group(w, att_ptr, flag_ptr, epoch, err_ptr, o_ptr, w_ptr, pid, tl.num_programs(0), H, NQD, TN, NQD_PAD,
                     R3, NKV, GD, True, 3)


@pytest.mark.parametrize("r3", [False, True])
def test_o_proj_by_group_adds_only_the_groups_whose_flag_is_ready(kernels, r3):
    """_o_proj_by_group polling the ready flags: groups 0 and 2 carry the epoch, 1 and 3 an older one and
    NaN outputs; after its polls give up (a small SPIN_LIMIT) the rows hold exactly the ready groups'
    products (a column of a group not ready would bring its NaN) and the error word is set."""
    probe = _o_proj_by_group_probe
    g = torch.Generator().manual_seed(3)
    nkv, h, tn = 4, 16, 8
    nqd = 256 if r3 else 128
    gd = nqd // nkv
    w = torch.randn(h, nqd, generator=g)
    att = torch.randn(nqd, generator=g)
    epoch = 1000
    flags = torch.tensor([epoch, epoch - 5, epoch, epoch - 5], dtype=torch.int64)
    for grp in (1, 3):
        att[grp * gd : (grp + 1) * gd] = float("nan")
    err = torch.zeros(1, dtype=torch.int64)
    o = torch.empty(h)
    probe[(h // tn,)](w, att, flags, err, o, epoch, h, NQD=nqd, TN=tn, NQD_PAD=nqd, R3=r3, NKV=nkv, GD=gd)
    ready = torch.cat([torch.arange(0, gd), torch.arange(2 * gd, 3 * gd)])
    exp = w.to(F64)[:, ready] @ att.to(F64)[ready]
    assert not o.isnan().any() and rel(o, exp) < 1e-6
    assert int(err[0]) == 1  # the polls gave up: groups 1 and 3 never showed the epoch


@pytest.mark.parametrize("rows3, programs, flags", [(7, 2, 0), (5, 1, 0), (7, 2, 1), (7, 1, 1)])
def test_decoder_layer_decode_rows3_tiles_match_float64_layer(kernels, rows3, programs, flags):
    """ROWS3 tiles (row, 256-element chunk, element: a warp per row) at a width of two chunks, one of
    them part padding (hidden 300, heads x head_size 256); one or two programs, so a program's tiles rotate
    through its ring. FLAGS: o_proj by KV group (two groups of 128 columns inside one 256-element chunk)."""
    hidden, inter, heads, kv_heads, head_size, block_size, eps, n_old = 300, 96, 8, 2, 32, 16, 1e-5, 40
    scale = head_size**-0.5
    w, cache, table, slot, pos, cs, hid, res, past_k, past_v = _decoder_layer_case(
        5, n_old, True, True, hidden=hidden, inter=inter, heads=heads, kv_heads=kv_heads, head_size=head_size)
    out, res_out = _run_decoder_layer(kernels, dict(DOT=0, ROWS3=rows3, programs=programs, TN_O=8, FLAGS=flags), w, cache, table,
                                      slot, pos, cs, hid, res, n_old, heads, kv_heads, head_size, True, eps)
    e_out, e_res, _, _ = _decoder_layer_ref(w, hid, res, pos, cs, past_k, past_v, heads, kv_heads, head_size,
                                            True, eps, scale)
    assert rel(out, e_out) < 1e-5 and rel(res_out, e_res) < 1e-6


def test_decoder_layer_decode_refuses_what_it_does_not_compute():
    w, cache, table, slot, pos, cs, hid, res, *_ = _decoder_layer_case(0, 4, True, True)
    args = dict(residual=res, positions=pos, input_norm_weight=w["input_norm"], qkv_weight=w["qkv"], o_weight=w["o"],
                post_norm_weight=w["post_norm"], gate_up_weight=w["gate_up"], down_weight=w["down"], eps=1e-5,
                num_heads=4, num_kv_heads=2, head_size=32, is_neox=True, scale=0.1, kv_cache=cache,
                slot_mapping=torch.tensor([slot]), block_table=table[None, :],
                seq_lens=torch.tensor([5], dtype=torch.int32), max_seq_len=64)
    two = dict(args, residual=torch.cat([res, res]), positions=pos.repeat(2), slot_mapping=torch.tensor([slot, slot + 1]),
               block_table=table[None, :].repeat(2, 1), seq_lens=torch.tensor([5, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="one token per call"):
        C.decoder_layer_decode(hidden_states=torch.cat([hid, hid]), cos_sin_cache=cs, **two)
    with pytest.raises(ValueError, match="partial rotary"):
        C.decoder_layer_decode(hidden_states=hid, cos_sin_cache=cs[:, :16], **args)
    # shapes that do not fit the layer: an error naming the argument, from the function and from the hook
    # (the kernel reads every weight by the hidden size and head counts)
    hook = dict(args, rotary_dim=32)
    hook.pop("max_seq_len")
    before = cache.nan_to_num(7.0)
    for bad, arg in ((dict(qkv_weight=w["qkv"][:-1]), "qkv_weight"), (dict(down_weight=w["down"][:, :-1]), "gate_up_weight"),
                     (dict(residual=res[:, :-1]), "residual"), (dict(slot_mapping=torch.tensor([slot, slot])), "slot_mapping"),
                     (dict(block_table=table), "block_table")):
        with pytest.raises(ValueError, match=arg):
            C.decoder_layer_decode(hidden_states=hid, cos_sin_cache=cs, **{**args, **bad})
        with pytest.raises(ValueError, match=arg):
            C.accel_decoder_layer_decode(hidden_states=hid, cos_sin_cache=cs, max_seq_len=64, **{**hook, **bad})
    assert torch.equal(cache.nan_to_num(7.0), before), "nothing may be written on bad input"


def test_decoder_layer_decode_hook_declines_what_it_does_not_fuse(kernels, monkeypatch):
    """None (the layer runs op by op) for two tokens with the rows path off, partial rotary, widths past
    MAX_PERSISTENT_WIDTH and ACCEL_CUDA_PERSISTENT=0; nothing written to the cache."""
    w, cache, table, slot, pos, cs, hid, res, *_ = _decoder_layer_case(0, 4, True, True)
    args = dict(residual=res, positions=pos, input_norm_weight=w["input_norm"], qkv_weight=w["qkv"], o_weight=w["o"],
                post_norm_weight=w["post_norm"], gate_up_weight=w["gate_up"], down_weight=w["down"], eps=1e-5,
                num_heads=4, num_kv_heads=2, head_size=32, rotary_dim=32, is_neox=True, scale=0.1, kv_cache=cache,
                slot_mapping=torch.tensor([slot]), block_table=table[None, :], seq_lens=torch.tensor([5], dtype=torch.int32),
                max_seq_len=64, hidden_states=hid, cos_sin_cache=cs)
    before = cache.nan_to_num(7.0)
    two = dict(args, hidden_states=torch.cat([hid, hid]), residual=torch.cat([res, res]), positions=pos.repeat(2),
               slot_mapping=torch.tensor([slot, slot + 1]), block_table=table[None, :].repeat(2, 1),
               seq_lens=torch.tensor([5, 5], dtype=torch.int32))
    monkeypatch.setitem(kernels.CONFIG, "rows_attention", {**kernels.CONFIG["rows_attention"], "enabled": 0})
    assert C.accel_decoder_layer_decode(**two) is None  # (on, two tokens take decoder_layer_rows: tested below)
    monkeypatch.undo()
    assert C.accel_decoder_layer_decode(**dict(args, rotary_dim=16, cos_sin_cache=cs[:, :16])) is None
    monkeypatch.setitem(kernels.MAX_PERSISTENT_WIDTH, "intermediate", 64)  # this case's 96 is then too wide
    assert C.accel_decoder_layer_decode(**args) is None
    monkeypatch.undo()
    monkeypatch.setenv("ACCEL_CUDA_PERSISTENT", "0")
    assert C.accel_decoder_layer_decode(**args) is None
    assert torch.equal(cache.nan_to_num(7.0), before)
    monkeypatch.delenv("ACCEL_CUDA_PERSISTENT")
    out, res_out = C.accel_decoder_layer_decode(**args)  # and the same call runs when nothing declines
    assert out.shape == hid.shape and not torch.equal(cache.nan_to_num(7.0), before)


def _moe_layer_case(seed, n_old, has_res, num_experts=6, top_k=2, inter=32, hidden=64, router_scale=3.0):
    """_decoder_layer_case's attention and a Mixtral feed-forward: router [E, H], w13 [E, 2I, H], w2 [E, H, I]
    (the router scaled so that the routing is far from a tie)."""
    w, cache, table, slot, pos, cs, hid, res, past_k, past_v = _decoder_layer_case(seed, n_old, has_res, True,
                                                                                  hidden=hidden)
    g = torch.Generator().manual_seed(seed + 100)
    del w["gate_up"], w["down"]
    w["router"] = torch.randn(num_experts, hidden, generator=g) * router_scale * hidden**-0.5
    w["w13"] = torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w["w2"] = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    return w, cache, table, slot, pos, cs, hid, res, past_k, past_v


def _moe_layer_ref(w, hid, res, pos, cs, past_k, past_v, top_k, renormalize, heads=4, kv_heads=2, head_size=32,
                   eps=1e-5):
    """The Mixtral layer in float64: the dense layer's attention half (_decoder_layer_ref, its MLP
    replaced), then the reference backend's router linear, moe_topk and fused_experts."""
    dense = dict(w, gate_up=torch.zeros(2, hid.shape[-1]), down=torch.zeros(hid.shape[-1], 1))
    _, resid2, k, v = _decoder_layer_ref(dense, hid, res, pos, cs, past_k, past_v, heads, kv_heads, head_size, True,
                                         eps, head_size**-0.5)
    w = {n: t.to(F64) for n, t in w.items()}
    x2 = R.accel_rms_norm(x=resid2, weight=w["post_norm"], eps=eps)
    wts, ids = R.accel_moe_topk(router_logits=x2 @ w["router"].T, top_k=top_k, scoring_func="softmax",
                                renormalize=renormalize, num_expert_group=None, topk_group=None,
                                e_score_correction_bias=None, routed_scaling_factor=1.0)
    out = R.accel_fused_experts(hidden_states=x2, w13=w["w13"], w2=w["w2"], topk_weights=wts, topk_ids=ids,
                                activation="silu", expert_map=None)
    return out, resid2, k, v, ids


def _run_moe_layer(kernels, overrides, w, cache, table, slot, pos, cs, hid, res, n_old, top_k, renormalize):
    saved = dict(kernels.CONFIG["decoder_layer"])
    kernels.CONFIG["decoder_layer"].update(overrides)
    try:
        return C.moe_decoder_layer_decode(
            hid, res, pos, w["input_norm"], w["qkv"], w["o"], w["post_norm"], w["router"], w["w13"], w["w2"], top_k,
            renormalize, 1e-5, cs, 4, 2, 32, True, 32**-0.5, cache, torch.tensor([slot]), table[None, :],
            torch.tensor([n_old + 1], dtype=torch.int32), max_seq_len=256)
    finally:
        kernels.CONFIG["decoder_layer"].clear()
        kernels.CONFIG["decoder_layer"].update(saved)


@pytest.mark.parametrize("seed, n_old, has_res, experts, top_k, inter, renormalize, overrides", [
    (0, 36, True, 6, 2, 32, True, {}),  # Mixtral's routing (renormalized), the whole router in one tile
    (1, 0, False, 8, 3, 48, False, dict(programs=1)),  # one program: every tile of every phase is its own
    # two programs, the router in chunks of 2 rows (through the lg scratch), 3 rows per gate/up tile
    # rounded down to 2 (a tile is one expert's: 2 divides 48 ... and 3 does not) and 2 rows of down
    (2, 20, True, 5, 2, 48, True, dict(programs=2, router_elems=128, TN_GU=4, TN_DOWN_MOE=2, ROWS3=0)),
    (3, 50, True, 4, 1, 32, True, dict(programs=3)),  # top-1, renormalized to weight 1
])
def test_moe_decoder_layer_decode_matches_float64_layer(kernels, seed, n_old, has_res, experts, top_k, inter,
                                                        renormalize, overrides):
    w, cache, table, slot, pos, cs, hid, res, past_k, past_v = _moe_layer_case(seed, n_old, has_res, experts, top_k,
                                                                              inter)
    out, res_out = _run_moe_layer(kernels, overrides, w, cache, table, slot, pos, cs, hid, res, n_old, top_k,
                                  renormalize)
    e_out, e_res, e_k, e_v, ids = _moe_layer_ref(w, hid, res, pos, cs, past_k, past_v, top_k, renormalize)
    assert rel(out, e_out) < 1e-5 and rel(res_out, e_res) < 1e-6
    blk, off = divmod(slot, 16)
    assert rel(cache[0, blk, :, off], e_k) < 1e-6 and rel(cache[1, blk, :, off], e_v) < 1e-6
    # a wrong expert would not pass: the layer with the runner-up expert in place of the last choice differs
    wrong = _moe_layer_ref(dict(w, router=w["router"].index_fill(0, ids[0, -1:].long(), -1e3)), hid, res, pos, cs,
                           past_k, past_v, top_k, renormalize)[0]
    assert rel(wrong, e_out) > 1e-2


def _rows_case(seed, n_olds, has_res, moe=False, block_size=16, hidden=64, heads=4, kv_heads=2, head_size=32):
    """Several sequences (cached lengths ``n_olds``) in one cache: _decoder_layer_case's (or
    _moe_layer_case's) weights, each sequence's own random blocks, one new token each."""
    w = (_moe_layer_case(seed, 1, True) if moe else _decoder_layer_case(seed, 1, True, True))[0]
    g = torch.Generator().manual_seed(seed + 7)
    blocks = [-(-(n + 1) // block_size) for n in n_olds]
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(n_olds), max(blocks) + 1, dtype=torch.int32)
    cache = torch.full((2, num_blocks, kv_heads, block_size, head_size), float("nan"))
    pasts, slots, i = [], [], 0
    for b, n in enumerate(n_olds):
        table[b, : blocks[b]] = perm[i : i + blocks[b]]
        i += blocks[b]
        pk, pv = torch.randn(n, kv_heads, head_size, generator=g), torch.randn(n, kv_heads, head_size, generator=g)
        for p in range(n):
            cache[0, table[b, p // block_size], :, p % block_size] = pk[p]
            cache[1, table[b, p // block_size], :, p % block_size] = pv[p]
        pasts.append((pk, pv))
        slots.append(int(table[b, n // block_size]) * block_size + n % block_size)
    pos = torch.tensor([n + 3 for n in n_olds])  # positions need not equal the cache index
    cs = torch.randn(max(n_olds) + 8, head_size, generator=g)
    hid = torch.randn(len(n_olds), hidden, generator=g)
    res = torch.randn(len(n_olds), hidden, generator=g) if has_res else None
    return w, cache, table, torch.tensor(slots), pos, cs, hid, res, pasts


def _rows_hook_args(w, cache, table, slots, pos, cs, hid, res, n_olds, moe=False, top_k=2):
    ff = (dict(router_weight=w["router"], w13=w["w13"], w2=w["w2"], top_k=top_k, renormalize=True) if moe
          else dict(gate_up_weight=w["gate_up"], down_weight=w["down"]))
    return dict(hidden_states=hid, residual=res, positions=pos, input_norm_weight=w["input_norm"], qkv_weight=w["qkv"],
                o_weight=w["o"], post_norm_weight=w["post_norm"], **ff, eps=1e-5, cos_sin_cache=cs, num_heads=4,
                num_kv_heads=2, head_size=32, rotary_dim=32, is_neox=True, scale=32**-0.5, kv_cache=cache,
                slot_mapping=slots, block_table=table, seq_lens=torch.tensor([n + 1 for n in n_olds], dtype=torch.int32),
                max_seq_len=256)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("n_olds, has_res, overrides", [
    ([36, 0, 17], True, dict(split_below=0)),  # no split: one item per (sequence, KV head); a first token
    # 16 splits of one 16-key tile: three sequences with partials (5, 3, 3 active splits), one direct store
    ([70, 5, 40, 33], False, dict(split_below=1e9, split_target=1e3, TILE_N=16)),
    ([150, 3], True, dict(split_below=1e9, split_target=1e3, TILE_N=16, max_splits=4)),  # more tiles than splits
    # the cached keys through the pipelined loop (PIPE): no split; 16 splits; more tiles than splits; GPT-J
    ([36, 0, 17], True, dict(split_below=0, pipe_stages=2)),
    ([70, 5, 40, 33], False, dict(split_below=1e9, split_target=1e3, TILE_N=16, pipe_stages=2)),
    ([150, 3], True, dict(split_below=1e9, split_target=1e3, TILE_N=16, max_splits=4, pipe_stages=3)),
])
def test_decoder_layer_rows_matches_float64_layer(kernels, monkeypatch, moe, n_olds, has_res, overrides):
    """Decode steps of 2+ sequences through the hook (decoder_layer_rows: the layer's ops with rotary, the
    KV write and attention in one launch) against the float64 layer of each row, the new keys and values
    at each slot, the cached ones untouched, the split counters back at zero."""
    _check_rows_layer(kernels, monkeypatch, moe, n_olds, has_res, overrides)


def test_decoder_layer_rows_pipelined_gptj_matches_float64_layer(kernels, monkeypatch):
    """The pipelined loop's whole heads from GPT-J-style (interleaved) rotary halves (dense: the float64 MoE
    layer is NeoX-style only)."""
    _check_rows_layer(kernels, monkeypatch, False, [45, 20, 1], True,
                      dict(split_below=1e9, split_target=1e3, TILE_N=16, pipe_stages=2), neox=False)


def _check_rows_layer(kernels, monkeypatch, moe, n_olds, has_res, overrides, neox=True):
    monkeypatch.setitem(kernels.CONFIG, "rows_attention",
                        {**kernels.CONFIG["rows_attention"], "min_programs": 0, **overrides})
    w, cache, table, slots, pos, cs, hid, res, pasts = _rows_case(len(n_olds) + 10 * moe, n_olds, has_res, moe)
    hook = C.accel_moe_decoder_layer_decode if moe else C.accel_decoder_layer_decode
    ran = []
    real = kernels.rope_attention_rows
    monkeypatch.setattr(kernels, "rope_attention_rows", lambda *a: ran.append(1) or real(*a))
    out, res_out = hook(**dict(_rows_hook_args(w, cache, table, slots, pos, cs, hid, res, n_olds, moe), is_neox=neox))
    assert ran and out.shape == hid.shape and res_out.shape == hid.shape
    for b, n in enumerate(n_olds):
        r = res[b : b + 1] if has_res else None
        if moe:
            e_out, e_res, e_k, e_v, _ = _moe_layer_ref(w, hid[b : b + 1], r, pos[b : b + 1], cs, *pasts[b], 2, True)
        else:
            e_out, e_res, e_k, e_v = _decoder_layer_ref(w, hid[b : b + 1], r, pos[b : b + 1], cs, *pasts[b], 4, 2,
                                                        32, neox, 1e-5, 32**-0.5)
        assert rel(out[b : b + 1], e_out) < 1e-5 and rel(res_out[b : b + 1], e_res) < 1e-6, b
        blk, off = divmod(int(slots[b]), 16)
        assert rel(cache[0, blk, :, off], e_k) < 1e-6 and rel(cache[1, blk, :, off], e_v) < 1e-6
        for p in range(n):
            assert torch.equal(cache[0, table[b, p // 16], :, p % 16], pasts[b][0][p])
    assert all(int(c.abs().sum()) == 0 for c in kernels._COUNTERS.values())


def test_decoder_layer_rows_declines_what_it_does_not_compute(kernels, monkeypatch):
    """The rows path off (CONFIG), too few programs for it, partial rotary, a cache of another dtype, a MoE
    top_k outside 1..experts: None, nothing written."""
    w, cache, table, slots, pos, cs, hid, res, _ = _rows_case(3, [9, 20], True)
    args = _rows_hook_args(w, cache, table, slots, pos, cs, hid, res, [9, 20])
    before = cache.nan_to_num(7.0)
    # 2 tokens x 2 KV heads = 4 programs: not more than min_programs (1.0) x the interpreter's 4 "SMs"
    assert C.accel_decoder_layer_decode(**args) is None
    assert "min_programs" in C.rows_layer_unsupported(hid, {}, 32, 4, 2, 32, cache)
    monkeypatch.setitem(kernels.CONFIG, "rows_attention", {**kernels.CONFIG["rows_attention"], "min_programs": 0})
    assert C.accel_decoder_layer_decode(**dict(args, rotary_dim=16, cos_sin_cache=cs[:, :16])) is None
    assert C.accel_decoder_layer_decode(**dict(args, kv_cache=cache.double())) is None
    monkeypatch.setitem(kernels.CONFIG, "rows_attention", {**kernels.CONFIG["rows_attention"], "enabled": 0,
                                                           "min_programs": 0})
    assert C.accel_decoder_layer_decode(**args) is None
    assert torch.equal(cache.nan_to_num(7.0), before)
    why = C.rows_layer_unsupported(hid, {"qkv": w["qkv"]}, 32, 4, 2, 32, cache)
    assert why and "rows_attention" in why
    # a top_k the router cannot give: declined before anything is written (op by op, moe_topk says why)
    monkeypatch.setitem(kernels.CONFIG, "rows_attention", {**kernels.CONFIG["rows_attention"], "enabled": 1,
                                                           "min_programs": 0})
    w, cache, table, slots, pos, cs, hid, res, _ = _rows_case(4, [9, 20, 3], True, moe=True)
    before = cache.nan_to_num(7.0)
    for top_k in (0, 7):  # 6 experts
        args = _rows_hook_args(w, cache, table, slots, pos, cs, hid, res, [9, 20, 3], moe=True, top_k=top_k)
        assert C.accel_moe_decoder_layer_decode(**args) is None
    assert torch.equal(cache.nan_to_num(7.0), before)
    out, _ = C.accel_moe_decoder_layer_decode(**dict(args, top_k=2))  # the same call runs with a valid top_k
    assert out.shape == hid.shape and not torch.equal(cache.nan_to_num(7.0), before)


def test_moe_tiles(kernels):
    cfg = kernels.CONFIG["decoder_layer"]
    # Mixtral small: 16 experts of 1024 at hidden 2048: the router in one tile, 8-row gate/up, 16-row down tiles
    assert kernels.moe_tiles(2048, 1024, 16, cfg) == {"E_PAD": 16, "RC": 16, "TN_GU": 8, "TN_DOWN": 16}
    # 60 experts (Qwen2-MoE's count): chunks of 16 rows; an intermediate of 1000 takes 8-row tiles, 1404 4-row ones
    assert kernels.moe_tiles(2048, 1000, 60, cfg) == {"E_PAD": 64, "RC": 16, "TN_GU": 8, "TN_DOWN": 16}
    assert kernels.moe_tiles(4096, 1404, 60, cfg)["TN_GU"] == 4


def test_moe_decoder_layer_decode_refuses_and_declines(kernels, monkeypatch):
    """Shapes that do not fit the layer: a ValueError naming the argument (from the function and the hook);
    what the kernel does not compute (two tokens with the rows path off, top_k past the experts or past 8, more
    than 256 experts, ACCEL_CUDA_PERSISTENT=0): the function's ValueError says why, the hook declines (None);
    nothing written."""
    w, cache, table, slot, pos, cs, hid, res, *_ = _moe_layer_case(0, 4, True)
    args = dict(hidden_states=hid, residual=res, positions=pos, input_norm_weight=w["input_norm"], qkv_weight=w["qkv"],
                o_weight=w["o"], post_norm_weight=w["post_norm"], router_weight=w["router"], w13=w["w13"], w2=w["w2"],
                top_k=2, renormalize=True, eps=1e-5, cos_sin_cache=cs, num_heads=4, num_kv_heads=2, head_size=32,
                is_neox=True, scale=0.1, kv_cache=cache, slot_mapping=torch.tensor([slot]),
                block_table=table[None, :], seq_lens=torch.tensor([5], dtype=torch.int32), max_seq_len=64)
    hook = dict(args, rotary_dim=32)
    before = cache.nan_to_num(7.0)
    # (the expert count is the router's rows, the intermediate size w2's columns)
    for bad, arg in ((dict(router_weight=w["router"][:-1]), "w13"), (dict(w13=w["w13"][:, :-2]), "w13"),
                     (dict(w2=w["w2"][:-1]), "w2"), (dict(router_weight=w["router"][:, :-1]), "router_weight")):
        with pytest.raises(ValueError, match=arg):
            C.moe_decoder_layer_decode(**{**args, **bad})
        with pytest.raises(ValueError, match=arg):
            C.accel_moe_decoder_layer_decode(**{**hook, **bad})
    with pytest.raises(ValueError, match="top_k 7 of 6 experts"):
        C.moe_decoder_layer_decode(**dict(args, top_k=7))
    assert C.accel_moe_decoder_layer_decode(**dict(hook, top_k=7)) is None
    assert C.accel_moe_decoder_layer_decode(**dict(hook, top_k=0)) is None
    monkeypatch.setattr(C, "MAX_PERSISTENT_EXPERTS", 4)
    with pytest.raises(ValueError, match="6 experts"):
        C.moe_decoder_layer_decode(**args)
    assert C.accel_moe_decoder_layer_decode(**hook) is None
    monkeypatch.undo()
    two = dict(hook, hidden_states=torch.cat([hid, hid]), residual=torch.cat([res, res]), positions=pos.repeat(2),
               slot_mapping=torch.tensor([slot, slot + 1]), block_table=table[None, :].repeat(2, 1),
               seq_lens=torch.tensor([5, 5], dtype=torch.int32))
    monkeypatch.setitem(kernels.CONFIG, "rows_attention", {**kernels.CONFIG["rows_attention"], "enabled": 0})
    assert C.accel_moe_decoder_layer_decode(**two) is None  # (on: decoder_layer_rows, tested above)
    monkeypatch.undo()
    monkeypatch.setenv("ACCEL_CUDA_PERSISTENT", "0")
    assert C.accel_moe_decoder_layer_decode(**hook) is None
    assert torch.equal(cache.nan_to_num(7.0), before), "nothing may be written on bad or declined input"
    monkeypatch.delenv("ACCEL_CUDA_PERSISTENT")
    out, res_out = C.accel_moe_decoder_layer_decode(**hook)  # and the same call runs when nothing declines
    assert out.shape == hid.shape and not torch.equal(cache.nan_to_num(7.0), before)


def test_decoder_layer_tiles_shrink_with_the_width(kernels):
    cfg = kernels.CONFIG["decoder_layer"]
    assert kernels.decoder_layer_tiles(2048, 2048, 8192, cfg) == {k: cfg[k] for k in ("TN", "TN_O", "TN_GU", "TN_DOWN")}
    wide = kernels.decoder_layer_tiles(4096, 4096, 16384, cfg)
    assert all(wide[k] * w <= kernels.TILE_ELEMS[k] for k, w in (("TN", 4096), ("TN_O", 4096), ("TN_GU", 4096),
                                                                   ("TN_DOWN", 16384)))
    assert wide["TN"] < cfg["TN"] and wide["TN_DOWN"] < cfg["TN_DOWN"]


def test_decoder_layer_decode_passes_the_kit_in_the_interpreter(kernels, monkeypatch):
    """The hook (API 1.4) through the conformance kit: one-token cases run the kernel (a phase per launch),
    cases of more tokens decoder_layer_rows (the ops, rotary + attention in one launch)."""
    from accel_models.testing import run_conformance

    ran, rows = [], []
    real = kernels.decoder_layer_decode
    monkeypatch.setattr(kernels, "decoder_layer_decode", lambda *a, **k: ran.append(1) or real(*a, **k))
    real_rows = kernels.rope_attention_rows
    monkeypatch.setattr(kernels, "rope_attention_rows", lambda *a: rows.append(1) or real_rows(*a))
    monkeypatch.setitem(kernels.CONFIG, "rows_attention", {**kernels.CONFIG["rows_attention"], "min_programs": 0})
    report = run_conformance("cuda", ops=["decoder_layer_decode"], allow_unavailable=True, device="cpu", quick=True,
                             max_examples=6, dtypes=(torch.float32,))
    assert report.passed, [(r.op, r.status, r.message) for r in report.ops]
    (rep,) = [r for r in report.ops if r.op == "decoder_layer_decode"]
    assert rep.native and rep.cases > 0 and ran and rows


def test_moe_decoder_layer_decode_passes_the_kit_in_the_interpreter(kernels, monkeypatch):
    """The MoE hook (API 1.5) through the conformance kit, as the dense one above."""
    from accel_models.testing import run_conformance

    ran, rows = [], []
    real = kernels.decoder_layer_decode
    monkeypatch.setattr(kernels, "decoder_layer_decode",
                        lambda *a, **k: ran.append(k.get("moe") is not None) or real(*a, **k))
    real_rows = kernels.rope_attention_rows
    monkeypatch.setattr(kernels, "rope_attention_rows", lambda *a: rows.append(1) or real_rows(*a))
    monkeypatch.setitem(kernels.CONFIG, "rows_attention", {**kernels.CONFIG["rows_attention"], "min_programs": 0})
    report = run_conformance("cuda", ops=["moe_decoder_layer_decode"], allow_unavailable=True, device="cpu",
                             quick=True, max_examples=6, dtypes=(torch.float32,))
    assert report.passed, [(r.op, r.status, r.message) for r in report.ops]
    (rep,) = [r for r in report.ops if r.op == "moe_decoder_layer_decode"]
    assert rep.native and rep.cases > 0 and ran and all(ran) and rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_is_torch_argmax_across_chunks(dtype, kernels, monkeypatch):
    """The packed-key argmax (API 1.6) against torch.argmax: first maximum across chunks, NaN the largest
    (first NaN wins), -0.0 equal to 0.0, -inf rows, strided rows; repeated launches (the words go back to
    rest)."""
    monkeypatch.setattr(kernels, "ARGMAX_BLOCK", 64)  # several chunks at interpreter-sized rows
    g = torch.Generator().manual_seed(7)
    cols = 300  # 5 chunks, the last partial
    x = torch.randn(9, cols, generator=g).to(dtype)
    x[1, [70, 10, 250]] = 50.0  # a tie across chunks: the first column wins
    x[2, [130, 200]] = float("nan")  # NaN wins over any number, the first NaN
    x[2, 5] = float("inf")
    x[3] = -torch.rand(cols, generator=g).to(dtype) - 1
    x[3, 140], x[3, 7], x[3, 299] = 0.0, -0.0, 0.0  # -0.0 == 0.0: the first of them
    x[4] = float("-inf")
    x[5, 299] = 100.0  # the maximum in the partial last chunk
    x[6] = 0.25  # a constant row
    # a NaN with the sign bit set is a NaN too (written as bits: conversions may drop a NaN's sign)
    bits = {torch.float32: (torch.int32, -4194304), torch.bfloat16: (torch.int16, -64), torch.float16: (torch.int16, -512)}
    x.view(bits[dtype][0])[7, 100] = bits[dtype][1]
    x[7, 200] = float("inf")
    want = x.argmax(dim=-1)
    assert torch.signbit(x[7, 100]) and want[7] == 100
    assert want[3] == 7 and want[1] == 10 and want[2] == 130
    for _ in range(2):
        out = torch.full((9,), -5, dtype=torch.int64)
        assert C.accel_argmax(x=x, out=out) is out
        assert out.tolist() == want.tolist()
    wide = torch.randn(4, 2 * cols, generator=g).to(dtype)
    xs = wide[:, ::2]  # column stride 2
    out = torch.zeros(4, dtype=torch.int64)
    C.accel_argmax(x=xs, out=out)
    assert out.tolist() == xs.argmax(dim=-1).tolist()
    buf = torch.full((6,), 123, dtype=torch.int64)  # a view of a larger buffer: only its rows are written
    C.accel_argmax(x=x[:3], out=buf[:3])
    assert buf.tolist() == want[:3].tolist() + [123, 123, 123]
    st = kernels.argmax_state(x.device, 9)
    assert (st[0] == kernels._INT64_MIN).all() and (st[1] == 0).all()  # at rest for the next launch


# ----------------------------------------------------------------------------------------------------
# whole tiny models on the kernels (the conformance kit's model check)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["llama", "mixtral", "qwen3", "deepseek_v2", "deepseek_v3"])
def test_tiny_models_match_the_reference_on_the_kernels(model, kernels):
    """The kit's model check (prefill of four prompts as one mixed batch, then three decode steps) with every
    op on this backend's kernels, against the float64 reference: DeepSeek-V3 brings latent attention (64-wide
    heads rotated on their first 32 channels in GPT-J pairs, value heads zero-padded), a float32 router
    beside float32 experts, and grouped sigmoid routing with the correction bias. Not yet run on a GPU."""
    from accel_models.backends import resolve_ops
    from accel_models.testing.models import check_model

    ops = resolve_ops("cuda", allow_unavailable=True)
    used = ("linear", "paged_attention", "rope_and_write_kv_cache", "moe_topk", "fused_experts", "rms_norm")
    assert all(ops.providers[op] == "cuda" for op in used), ops.providers
    result = check_model(model, "cuda", dtype=torch.float32, device="cpu", allow_unavailable=True)
    assert result["status"] == "pass", result
