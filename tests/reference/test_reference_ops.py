"""The reference backend's ops against naive float64 implementations (tests/reference/_naive_ops.py).

Each test draws shapes, dtypes and layouts with hypothesis, runs the reference op through the bound op
table (exactly as a layer calls it), and compares with the naive loop version computed in float64 on the
same (dtype-rounded) inputs. Tolerances per dtype follow DESIGN.md (FlagGems' table, relative-style).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import _naive_ops as naive
import accel_models

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
#: rtol per input dtype; atol is the same times the magnitude of the expected values (at least 1).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def ops():
    return accel_models.resolve_ops("reference")


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def assert_close(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, factor: float = 1.0) -> None:
    exp = torch.as_tensor(expected, dtype=torch.float64)
    tol = TOL[dtype] * factor
    scale = max(1.0, float(exp.abs().max())) if exp.numel() else 1.0
    torch.testing.assert_close(actual.to(torch.float64), exp, rtol=tol, atol=tol * scale)


def make(shape, dtype, gen, layout="contiguous", scale=1.0) -> torch.Tensor:
    """A random tensor of ``shape``; ``layout`` "strided" returns a non-contiguous view with those values."""
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if layout == "strided":
        big = torch.zeros((*shape[:-1], 2 * shape[-1] + 1), dtype=dtype)
        view = big[..., 1::2]
        view.copy_(t)
        assert not view.is_contiguous() or view.numel() <= 1
        return view
    return t


def seeded(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


layouts = st.sampled_from(["contiguous", "strided"])
dtypes = st.sampled_from(DTYPES)


# ----------------------------------------------------------------------------------------------------
# normalization and activations
# ----------------------------------------------------------------------------------------------------


@given(data=st.data(), dtype=dtypes, layout=layouts,
       hidden=st.sampled_from([1, 5, 8, 33, 127, 769]),
       lead=st.lists(st.integers(1, 4), min_size=1, max_size=2),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rms_norm(ops, data, dtype, layout, hidden, lead, eps):
    gen = seeded(data)
    x = make((*lead, hidden), dtype, gen, layout, scale=3.0)
    w = make((hidden,), dtype, gen)
    x_before = x.clone()
    out = ops.rms_norm(x=x, weight=w, eps=eps)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(x, x_before), "rms_norm must not modify x"
    assert_close(out, naive.rms_norm(np64(x), np64(w), eps), dtype, factor=2)


@given(data=st.data(), dtype=dtypes, layout=layouts, hidden=st.sampled_from([1, 7, 64, 129]),
       tokens=st.integers(1, 6))
def test_fused_add_rms_norm(ops, data, dtype, layout, hidden, tokens):
    gen = seeded(data)
    x = make((tokens, hidden), dtype, gen, layout)
    res = make((tokens, hidden), dtype, gen, layout)
    w = make((hidden,), dtype, gen)
    x64, r64 = np64(x), np64(res)
    # "may be in place": callers use the returned tensors and treat x and residual as consumed
    out, res_out = ops.fused_add_rms_norm(x=x.clone(), residual=res.clone(), weight=w, eps=1e-6)
    assert out.dtype == dtype and res_out.dtype == dtype and out.shape == res_out.shape == x.shape
    assert_close(res_out, x64 + r64, dtype)
    assert_close(out, naive.rms_norm(x64 + r64, np64(w), 1e-6), dtype, factor=3)


@given(data=st.data(), dtype=dtypes, layout=layouts, d=st.sampled_from([1, 3, 8, 33]),
       lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       kind=st.sampled_from(["silu", "none", "tanh"]))
def test_act_and_mul(ops, data, dtype, layout, d, lead, kind):
    gen = seeded(data)
    x = make((*lead, 2 * d), dtype, gen, layout, scale=3.0)
    before = x.clone()
    if kind == "silu":
        out, act = ops.silu_and_mul(x=x), naive.silu
    else:
        out, act = ops.gelu_and_mul(x=x, approximate=kind), (lambda v: naive.gelu(v, kind))
    assert out.shape == (*lead, d) and out.dtype == dtype
    assert torch.equal(x, before), "act_and_mul must not modify x"
    assert_close(out, naive.act_and_mul(np64(x), act), dtype, factor=2)


# ----------------------------------------------------------------------------------------------------
# rotary
# ----------------------------------------------------------------------------------------------------


def cos_sin_cache(max_pos: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


@given(data=st.data(), dtype=dtypes, head_size=st.sampled_from([2, 8, 16, 64, 80]),
       heads=st.integers(1, 4), kv_heads=st.integers(1, 2), tokens=st.integers(1, 8),
       is_neox=st.booleans(), three_d=st.booleans(), with_key=st.booleans(), cache_fp32=st.booleans())
def test_rotary_embedding(ops, data, dtype, head_size, heads, kv_heads, tokens, is_neox, three_d, with_key, cache_fp32):
    gen = seeded(data)
    # full or partial rotary (e.g. GPT-NeoX's rotary_pct=0.25, ChatGLM's half)
    candidates = sorted({r for r in (head_size, head_size // 2, head_size // 4, 2) if r >= 2 and r % 2 == 0})
    rotary_dim = data.draw(st.sampled_from(candidates), label="rotary_dim")
    max_pos = 64
    cache = cos_sin_cache(max_pos, rotary_dim).to(torch.float32 if cache_fp32 else dtype)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen, dtype=torch.int64)
    # q and k as views of a packed qkv projection: non-contiguous, as a layer passes them
    qkv = make((tokens, (heads + 2 * kv_heads) * head_size), dtype, gen)
    q = qkv[:, : heads * head_size]
    k = qkv[:, heads * head_size : (heads + kv_heads) * head_size] if with_key else None
    if three_d:
        q = q.unflatten(-1, (heads, head_size))
        k = k.unflatten(-1, (kv_heads, head_size)) if k is not None else None
    q0 = q.clone()
    k0 = k.clone() if k is not None else None
    # the spec casts cos/sin to the query's dtype before the products
    cs = np64(cache.to(dtype))
    q_out, k_out = ops.rotary_embedding(positions=positions, query=q.clone(), key=k.clone() if k is not None else None,
                                        cos_sin_cache=cache, head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox)
    assert q_out.shape == q.shape and q_out.dtype == dtype
    assert_close(q_out, naive.rotary(positions.tolist(), np64(q0), cs, head_size, rotary_dim, is_neox), dtype, factor=2)
    # the dims past rotary_dim pass through bit for bit
    tail = q_out.reshape(tokens, heads, head_size)[..., rotary_dim:]
    assert torch.equal(tail, q0.reshape(tokens, heads, head_size)[..., rotary_dim:])
    if k is None:
        assert k_out is None
    else:
        assert k_out.shape == k.shape and k_out.dtype == dtype
        assert_close(k_out, naive.rotary(positions.tolist(), np64(k0), cs, head_size, rotary_dim, is_neox), dtype, factor=2)


# ----------------------------------------------------------------------------------------------------
# paged KV cache and attention
# ----------------------------------------------------------------------------------------------------


def run_paged_attention(ops, gen, dtype, *, block_size, kv_heads, group, head_size, seqs, sliding_window, soft_cap):
    """Write each sequence's context into a NaN-filled cache (random block ids), attend, compare with naive.

    ``seqs`` is a list of (seq_len, q_len). Returns nothing; asserts.
    """
    heads = kv_heads * group
    n_blocks_of = [-(-s // block_size) for s, _ in seqs]
    num_blocks = sum(n_blocks_of) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled block ids
    width = max(n_blocks_of) + 2
    # entries past a sequence's last block are ignored: fill them with garbage, out-of-range included
    block_table = torch.randint(-3, 4 * num_blocks, (len(seqs), width), generator=gen).to(torch.int32)
    for b, n in enumerate(n_blocks_of):
        block_table[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]

    cache = ops.allocate_kv_cache(num_blocks=num_blocks, block_size=block_size, num_kv_heads=kv_heads,
                                  head_size=head_size, dtype=dtype, device=torch.device("cpu"))
    cache.fill_(float("nan"))  # unwritten slots must never leak into the result
    keys = [make((s, kv_heads, head_size), dtype, gen) for s, _ in seqs]
    values = [make((s, kv_heads, head_size), dtype, gen) for s, _ in seqs]

    def slot(b: int, pos: int) -> int:
        return int(block_table[b, pos // block_size]) * block_size + pos % block_size

    # the cached context first, then the new tokens with padding slots (-1) in between
    for new in (False, True):
        k_rows, v_rows, slots = [], [], []
        for b, (s, q_len) in enumerate(seqs):
            for pos in range(s - q_len, s) if new else range(s - q_len):
                k_rows.append(keys[b][pos])
                v_rows.append(values[b][pos])
                slots.append(slot(b, pos))
            if new:  # a padding token whose K/V must not be written anywhere
                k_rows.append(torch.full((kv_heads, head_size), 1e4, dtype=dtype))
                v_rows.append(torch.full((kv_heads, head_size), 1e4, dtype=dtype))
                slots.append(-1)
        if slots:
            ops.write_kv_cache(key=torch.stack(k_rows), value=torch.stack(v_rows), kv_cache=cache,
                               slot_mapping=torch.tensor(slots, dtype=torch.int64))

    q_lens = [q for _, q in seqs]
    seq_lens = [s for s, _ in seqs]
    num_tokens = sum(q_lens)
    query = make((num_tokens, heads, head_size + 3), dtype, gen)[..., :head_size]  # non-contiguous
    assert not query.is_contiguous() or query.shape[:2] == (1, 1)
    q_before, cache_before = query.clone(), cache.clone()
    scale = head_size**-0.5
    out = ops.paged_attention(
        query=query, kv_cache=cache, block_table=block_table,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0, *np.cumsum(q_lens).tolist()], dtype=torch.int32),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), scale=scale,
        sliding_window=sliding_window, logits_soft_cap=soft_cap,
    )
    assert out.shape == (num_tokens, heads, head_size) and out.dtype == dtype
    assert torch.equal(query, q_before), "paged_attention must not modify query"
    torch.testing.assert_close(cache, cache_before, rtol=0, atol=0, equal_nan=True)
    expected = naive.paged_attention(np64(query), [np64(k) for k in keys], [np64(v) for v in values],
                                     q_lens, seq_lens, scale, sliding_window, soft_cap)
    assert_close(out, expected, dtype, factor=4 if dtype != torch.float64 else 100)


@st.composite
def batches(draw):
    seqs = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["prefill", "chunked", "decode"]))
        s = draw(st.integers(1, 20))
        q = s if kind == "prefill" else 1 if kind == "decode" else draw(st.integers(1, s))
        seqs.append((s, q))
    return seqs


@settings(max_examples=40)
@given(data=st.data(), dtype=dtypes, block_size=st.sampled_from([1, 2, 4, 8, 16, 32]),
       kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 3, 4]), head_size=st.sampled_from([8, 24, 64]),
       seqs=batches(), sliding_window=st.none() | st.integers(1, 12),
       soft_cap=st.none() | st.sampled_from([5.0, 30.0]))
def test_paged_attention(ops, data, dtype, block_size, kv_heads, group, head_size, seqs, sliding_window, soft_cap):
    run_paged_attention(ops, seeded(data), dtype, block_size=block_size, kv_heads=kv_heads, group=group,
                        head_size=head_size, seqs=seqs, sliding_window=sliding_window, soft_cap=soft_cap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("sliding_window", "soft_cap"), [(None, None), (4, None), (None, 10.0), (3, 20.0)])
@pytest.mark.parametrize("seqs", [
    [(13, 13), (17, 5), (9, 1), (33, 1), (1, 1)],  # prefill, chunked prefill, two decodes, one-token prefill
    [(9, 1), (33, 1), (1, 1), (16, 1)],  # a pure decode batch
], ids=["mixed", "decode"])
def test_paged_attention_batch_kinds(ops, dtype, sliding_window, soft_cap, seqs):
    """Explicit batches (GQA 4:1, block size 4) besides the drawn ones."""
    run_paged_attention(ops, torch.Generator().manual_seed(0), dtype, block_size=4, kv_heads=2, group=4,
                        head_size=16, seqs=seqs, sliding_window=sliding_window, soft_cap=soft_cap)


def test_write_kv_cache_layout_and_padding(ops):
    """The reference's declared layout: [2, num_blocks, block_size, kv_heads, head_size]; slot -1 writes nothing."""
    layout = ops.kv_cache_layout(num_kv_heads=3, head_size=8, dtype=torch.bfloat16)
    assert layout.bytes_per_token == 2 * 3 * 8 * 2 and layout.block_sizes[0] == 16
    cache = ops.allocate_kv_cache(num_blocks=5, block_size=4, num_kv_heads=3, head_size=8,
                                  dtype=torch.float32, device=torch.device("cpu"))
    assert cache.shape == (2, 5, 4, 3, 8)
    cache.fill_(7.0)
    gen = torch.Generator().manual_seed(1)
    k = make((4, 3, 12), torch.float32, gen)[..., :8]  # non-contiguous
    v = make((4, 3, 8), torch.float32, gen)
    k0, v0 = k.clone(), v.clone()
    slots = torch.tensor([17, -1, 0, 6], dtype=torch.int64)
    ops.write_kv_cache(key=k, value=v, kv_cache=cache, slot_mapping=slots)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    expected = torch.full_like(cache, 7.0)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            expected[0, s // 4, s % 4] = k0[i]
            expected[1, s // 4, s % 4] = v0[i]
    assert torch.equal(cache, expected)


# ----------------------------------------------------------------------------------------------------
# mixture of experts
# ----------------------------------------------------------------------------------------------------


@st.composite
def routings(draw):
    grouped = draw(st.booleans())
    if grouped:
        num_groups = draw(st.sampled_from([2, 4, 8]))
        size = draw(st.integers(1, 4))
        topk_group = draw(st.integers(1, num_groups))
        top_k = draw(st.integers(1, topk_group * size))
        return num_groups * size, top_k, num_groups, topk_group
    num_experts = draw(st.integers(1, 16))
    return num_experts, draw(st.integers(1, num_experts)), None, None


@settings(max_examples=50)
@given(data=st.data(), dtype=dtypes, layout=layouts, routing=routings(), tokens=st.integers(1, 8),
       scoring_func=st.sampled_from(["softmax", "sigmoid"]), renormalize=st.booleans(), with_bias=st.booleans(),
       routed_scaling_factor=st.sampled_from([1.0, 2.5]))
def test_moe_topk(ops, data, dtype, layout, routing, tokens, scoring_func, renormalize, with_bias, routed_scaling_factor):
    num_experts, top_k, num_expert_group, topk_group = routing
    gen = seeded(data)
    logits = make((tokens, num_experts), dtype, gen, layout, scale=2.0)
    bias = (torch.rand(num_experts, generator=gen) * 0.5 - 0.25).to(torch.float32) if with_bias else None
    before = logits.clone()
    weights, ids = ops.moe_topk(router_logits=logits, top_k=top_k, scoring_func=scoring_func,
                                renormalize=renormalize, num_expert_group=num_expert_group, topk_group=topk_group,
                                e_score_correction_bias=bias, routed_scaling_factor=routed_scaling_factor)
    assert torch.equal(logits, before)
    # float32 weights (float64 for float64 logits: float64 models stay float64 end to end)
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert weights.dtype == w_dtype and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (tokens, top_k)
    exp_w, exp_ids = naive.moe_topk(np64(logits), top_k, scoring_func, renormalize, num_expert_group, topk_group,
                                    np64(bias) if bias is not None else None, routed_scaling_factor)
    np.testing.assert_array_equal(ids.numpy(), exp_ids)
    assert_close(weights, exp_w, w_dtype, factor=1 if w_dtype == torch.float32 else 100)  # scoring in w_dtype


def test_moe_topk_deepseek_v3_semantics(ops):
    """The bias steers the choice (groups by top-2 sum, experts by biased score) but not the weights."""
    logits = torch.tensor([[0.0, 0.1, 3.0, -3.0, 0.2, 0.3, 0.4, 0.5]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0])
    weights, ids = ops.moe_topk(router_logits=logits, top_k=2, scoring_func="sigmoid", renormalize=False,
                                num_expert_group=4, topk_group=1, e_score_correction_bias=bias,
                                routed_scaling_factor=2.0)
    # group 3 (experts 6, 7) wins on its biased top-2 sum even though expert 2 has the largest score
    assert ids.tolist() == [[6, 7]]
    torch.testing.assert_close(weights, 2.0 * torch.sigmoid(torch.tensor([[0.4, 0.5]])))
    # without the bias, group 1 (experts 2, 3) wins on its max, the weights renormalize over its experts
    weights, ids = ops.moe_topk(router_logits=logits, top_k=2, scoring_func="sigmoid", renormalize=True,
                                num_expert_group=4, topk_group=1, e_score_correction_bias=None,
                                routed_scaling_factor=1.0)
    assert ids.tolist() == [[2, 3]]
    s = torch.sigmoid(torch.tensor([3.0, -3.0]))
    torch.testing.assert_close(weights, (s / s.sum())[None])


def test_moe_topk_ties_break_toward_lower_id(ops):
    _, ids = ops.moe_topk(router_logits=torch.zeros(2, 6), top_k=3, scoring_func="softmax", renormalize=True,
                          num_expert_group=None, topk_group=None, e_score_correction_bias=None,
                          routed_scaling_factor=1.0)
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]]


@settings(max_examples=40)
@given(data=st.data(), dtype=dtypes, layout=layouts, hidden=st.sampled_from([1, 7, 33]),
       inter=st.sampled_from([1, 4, 9]), num_experts=st.integers(1, 8), tokens=st.integers(1, 10),
       activation=st.sampled_from(["silu", "gelu"]), expert_parallel=st.booleans())
def test_fused_experts(ops, data, dtype, layout, hidden, inter, num_experts, tokens, activation, expert_parallel):
    gen = seeded(data)
    top_k = data.draw(st.integers(1, num_experts), label="top_k")
    expert_map = None
    num_local = num_experts
    if expert_parallel:  # this rank holds a random subset of the experts; the others map to -1
        local = sorted(data.draw(st.sets(st.integers(0, num_experts - 1), min_size=1), label="local experts"))
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(len(local), dtype=torch.int32)
        num_local = len(local)
    x = make((tokens, hidden), dtype, gen, layout)
    w13 = make((num_local, 2 * inter, hidden), dtype, gen, scale=hidden**-0.5)
    w2 = make((num_local, hidden, inter), dtype, gen, scale=inter**-0.5)
    topk_ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]).to(torch.int32)
    # float32 routing weights (float64 for float64 hidden states)
    topk_weights = torch.rand((tokens, top_k), generator=gen, dtype=torch.float64).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    inputs = [x, w13, w2, topk_weights, topk_ids] + ([expert_map] if expert_map is not None else [])
    before = [t.clone() for t in inputs]
    out = ops.fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids,
                            activation=activation, expert_map=expert_map)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before)), "fused_experts must not modify its inputs"
    assert out.shape == (tokens, hidden) and out.dtype == dtype
    expected = naive.fused_experts(np64(x), np64(w13), np64(w2), np64(topk_weights), topk_ids.numpy(), activation,
                                   expert_map.numpy() if expert_map is not None else None)
    assert_close(out, expected, dtype, factor=4 if dtype != torch.float64 else 100)


def test_fused_experts_all_remote(ops):
    """Tokens routed only to experts another rank holds get exactly zero."""
    x = torch.randn(3, 8)
    out = ops.fused_experts(hidden_states=x, w13=torch.randn(1, 4, 8), w2=torch.randn(1, 8, 2),
                            topk_weights=torch.ones(3, 2), topk_ids=torch.tensor([[1, 2]] * 3, dtype=torch.int32),
                            activation="silu", expert_map=torch.tensor([0, -1, -1], dtype=torch.int32))
    assert torch.equal(out, torch.zeros(3, 8))


# ----------------------------------------------------------------------------------------------------
# W8A8
# ----------------------------------------------------------------------------------------------------


@given(data=st.data(), dtype=dtypes, layout=layouts, rows=st.integers(1, 6), k=st.sampled_from([1, 5, 64, 129]),
       zero_row=st.booleans())
def test_dynamic_int8_quant(ops, data, dtype, layout, rows, k, zero_row):
    gen = seeded(data)
    x = make((rows, k), dtype, gen, layout, scale=data.draw(st.sampled_from([1e-3, 1.0, 50.0]), label="scale"))
    if zero_row:
        x[0] = 0
    before = x.clone()
    x_q, scales = ops.dynamic_int8_quant(x=x)
    assert torch.equal(x, before)
    assert x_q.dtype == torch.int8 and x_q.shape == (rows, k)
    assert scales.dtype == torch.float32 and scales.shape == (rows, 1)
    exp_q, exp_scales, ambiguous = naive.dynamic_int8_quant(np64(x))
    torch.testing.assert_close(scales.double(), torch.as_tensor(exp_scales), rtol=2e-7, atol=0)
    q = x_q.numpy().astype(np.int64)
    # exact, except an off-by-one allowed where x * 127 / amax is within float32 rounding of a half-integer
    np.testing.assert_array_equal(q[~ambiguous], exp_q[~ambiguous])
    assert np.all(np.abs(q - exp_q)[ambiguous] <= 1)
    assert q.min() >= -127 and q.max() <= 127
    if zero_row:
        assert scales[0, 0] == 0 and not x_q[0].any()


def test_dynamic_int8_quant_rounds_half_to_even(ops):
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]])
    x_q, scales = ops.dynamic_int8_quant(x=x)
    assert x_q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]
    assert scales.tolist() == [[1.0]]


@given(data=st.data(), m=st.integers(1, 8), n=st.integers(1, 8), k=st.sampled_from([1, 16, 100, 512]),
       b_transposed=st.booleans(), out_dtype=st.sampled_from(DTYPES), with_bias=st.booleans())
def test_int8_scaled_mm(ops, data, m, n, k, b_transposed, out_dtype, with_bias):
    gen = seeded(data)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8).t() if b_transposed else \
        torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    acc = naive.int8_mm(a.numpy(), b.numpy())
    # exact integer check: unit scales, |acc| <= 128 * 128 * 512 < 2**24 is exact in float32
    ones = ops.int8_scaled_mm(a=a, b=b, scale_a=torch.ones(m, 1), scale_b=torch.ones(n), out_dtype=torch.float32,
                              bias=None)
    np.testing.assert_array_equal(ones.numpy().astype(np.int64), acc)
    scale_a = torch.rand((m, 1), generator=gen) * 0.01
    scale_b = torch.rand((n,), generator=gen) * 0.01
    bias = torch.randn((n,), generator=gen) if with_bias else None
    a0, b0 = a.clone(), b.clone()
    out = ops.int8_scaled_mm(a=a, b=b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, bias=bias)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    assert out.dtype == out_dtype and out.shape == (m, n)
    expected = acc * np64(scale_a) * np64(scale_b)[None, :] + (np64(bias)[None, :] if bias is not None else 0.0)
    # scaling is specified in float32
    assert_close(out, expected, torch.float32 if out_dtype == torch.float64 else out_dtype, factor=2)


@given(data=st.data(), dtype=dtypes, layout=layouts, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       n=st.integers(1, 9), k=st.sampled_from([1, 3, 16, 40]), with_bias=st.booleans())
def test_linear(ops, data, dtype, layout, lead, n, k, with_bias):
    gen = seeded(data)
    x = make((*lead, k), dtype, gen, layout)
    w = make((n, k), dtype, gen, layout)
    bias = make((n,), dtype, gen) if with_bias else None
    w0 = w.clone()
    prepared = ops.prepare_linear(weight=w)
    assert prepared is None  # the reference prepares nothing: torch reads nn.Linear's layout as it is
    out = ops.linear(x=x, weight=w, bias=bias, prepared=prepared)
    assert torch.equal(w, w0) and out.dtype == dtype and out.shape == (*lead, n)
    assert_close(out, naive.linear(np64(x), np64(w), np64(bias) if bias is not None else None), dtype,
                 factor=max(1.0, k**0.5))


# ----------------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument
# ----------------------------------------------------------------------------------------------------

_f = torch.randn
_i32 = torch.int32


def _attn_kwargs(**over):
    kw = dict(query=_f(2, 4, 8), kv_cache=torch.zeros(2, 4, 16, 2, 8),
              block_table=torch.zeros(2, 1, dtype=_i32), seq_lens=torch.tensor([1, 1], dtype=_i32),
              query_start_loc=torch.tensor([0, 1, 2], dtype=_i32), max_query_len=1, max_seq_len=1, scale=1.0,
              sliding_window=None, logits_soft_cap=None)
    kw.update(over)
    return kw


def _topk_kwargs(**over):
    kw = dict(router_logits=_f(3, 8), top_k=2, scoring_func="softmax", renormalize=False, num_expert_group=None,
              topk_group=None, e_score_correction_bias=None, routed_scaling_factor=1.0)
    kw.update(over)
    return kw


def _experts_kwargs(**over):
    kw = dict(hidden_states=_f(3, 8), w13=_f(2, 4, 8), w2=_f(2, 8, 2), topk_weights=torch.ones(3, 1),
              topk_ids=torch.zeros(3, 1, dtype=_i32), activation="silu", expert_map=None)
    kw.update(over)
    return kw


def _rope_kwargs(**over):
    kw = dict(positions=torch.tensor([0, 1]), query=_f(2, 16), key=None, cos_sin_cache=cos_sin_cache(4, 8).float(),
              head_size=8, rotary_dim=8, is_neox=True)
    kw.update(over)
    return kw


def _mm_kwargs(**over):
    kw = dict(a=torch.ones(2, 4, dtype=torch.int8), b=torch.ones(3, 4, dtype=torch.int8), scale_a=torch.ones(2, 1),
              scale_b=torch.ones(3), out_dtype=torch.float32, bias=None)
    kw.update(over)
    return kw


BAD_INPUTS = [
    ("rms_norm", dict(x=torch.ones(2, 4, dtype=torch.int32), weight=_f(4), eps=1e-6), "x"),
    ("rms_norm", dict(x=_f(2, 4), weight=_f(5), eps=1e-6), "weight"),
    ("fused_add_rms_norm", dict(x=_f(2, 4), residual=_f(2, 5), weight=_f(4), eps=1e-6), "residual"),
    ("silu_and_mul", dict(x=_f(2, 5)), "x"),
    ("silu_and_mul", dict(x=torch.ones(2, 4, dtype=torch.int64)), "x"),
    ("gelu_and_mul", dict(x=_f(2, 4), approximate="fast"), "approximate"),
    ("rotary_embedding", _rope_kwargs(positions=torch.tensor([0, 1], dtype=_i32)), "positions"),
    ("rotary_embedding", _rope_kwargs(positions=torch.tensor([0, 4])), "positions"),
    ("rotary_embedding", _rope_kwargs(rotary_dim=7), "rotary_dim"),
    ("rotary_embedding", _rope_kwargs(cos_sin_cache=cos_sin_cache(4, 4).float()), "cos_sin_cache"),
    ("rotary_embedding", _rope_kwargs(query=_f(2, 12)), "query"),
    ("rotary_embedding", _rope_kwargs(key=_f(3, 8)), "key"),
    ("rotary_embedding", _rope_kwargs(query=_f(2, 1, 16)), "query"),
    ("rotary_embedding", _rope_kwargs(positions=torch.zeros(0, dtype=torch.int64), query=_f(0, 12)), "query"),
    ("kv_cache_layout", dict(num_kv_heads=2, head_size=8, dtype=torch.int8), "dtype"),
    ("allocate_kv_cache", dict(num_blocks=4, block_size=3, num_kv_heads=2, head_size=8, dtype=torch.float32,
                               device=torch.device("cpu")), "block_size"),
    ("write_kv_cache", dict(key=_f(2, 2, 8), value=_f(2, 2, 8), kv_cache=torch.zeros(2, 4, 16, 2, 8),
                            slot_mapping=torch.tensor([0, 1], dtype=_i32)), "slot_mapping"),
    ("write_kv_cache", dict(key=_f(2, 3, 8), value=_f(2, 2, 8), kv_cache=torch.zeros(2, 4, 16, 2, 8),
                            slot_mapping=torch.tensor([0, 1])), "key"),
    ("write_kv_cache", dict(key=_f(2, 2, 8), value=_f(2, 2, 8), kv_cache=torch.zeros(4, 16, 2, 8),
                            slot_mapping=torch.tensor([0, 1])), "kv_cache"),
    ("paged_attention", _attn_kwargs(block_table=torch.zeros(2, 1, dtype=torch.int64)), "block_table"),
    ("paged_attention", _attn_kwargs(seq_lens=torch.tensor([1, 1])), "seq_lens"),
    ("paged_attention", _attn_kwargs(query=_f(2, 3, 8)), "query"),
    ("paged_attention", _attn_kwargs(query=torch.ones(2, 4, 8, dtype=torch.int32)), "query"),
    ("paged_attention", _attn_kwargs(query_start_loc=torch.tensor([0, 2], dtype=_i32)), "query_start_loc"),
    ("paged_attention", _attn_kwargs(max_seq_len=17), "block_table"),
    ("paged_attention", _attn_kwargs(seq_lens=torch.tensor([1, 9], dtype=_i32)), "max_seq_len"),
    ("argmax", dict(x=torch.ones(2, 4, dtype=torch.int64), out=torch.zeros(2, dtype=torch.int64)), "x"),
    ("argmax", dict(x=_f(2, 3, 4), out=torch.zeros(2, dtype=torch.int64)), "x"),
    ("argmax", dict(x=_f(2, 0), out=torch.zeros(2, dtype=torch.int64)), "x"),
    ("argmax", dict(x=_f(2, 4), out=torch.zeros(2, dtype=torch.int32)), "out"),
    ("argmax", dict(x=_f(2, 4), out=torch.zeros(3, dtype=torch.int64)), "out"),
    ("argmax", dict(x=_f(2, 4), out=torch.zeros(2, 2, dtype=torch.int64)[:, 0]), "out"),
    ("moe_topk", _topk_kwargs(scoring_func="relu"), "scoring_func"),
    ("moe_topk", _topk_kwargs(top_k=9), "top_k"),
    ("moe_topk", _topk_kwargs(router_logits=_f(3, 8).long()), "router_logits"),
    ("moe_topk", _topk_kwargs(router_logits=_f(1, 3, 8)), "router_logits"),
    ("moe_topk", _topk_kwargs(num_expert_group=3, topk_group=1), "num_expert_group"),
    ("moe_topk", _topk_kwargs(num_expert_group=4, topk_group=1, top_k=3), "top_k"),
    ("moe_topk", _topk_kwargs(e_score_correction_bias=torch.zeros(7)), "e_score_correction_bias"),
    ("fused_experts", _experts_kwargs(activation="relu"), "activation"),
    ("fused_experts", _experts_kwargs(topk_ids=torch.zeros(3, 1, dtype=torch.int64)), "topk_ids"),
    ("fused_experts", _experts_kwargs(w13=_f(2, 4, 7)), "w13"),
    ("fused_experts", _experts_kwargs(w2=_f(2, 8)), "w2"),
    ("fused_experts", _experts_kwargs(hidden_states=_f(1, 3, 8)), "hidden_states"),
    ("fused_experts", _experts_kwargs(hidden_states=torch.ones(3, 8, dtype=torch.int32)), "hidden_states"),
    ("fused_experts", _experts_kwargs(topk_ids=torch.full((3, 1), 5, dtype=_i32)), "topk_ids"),
    ("fused_experts", _experts_kwargs(expert_map=torch.zeros(2, dtype=torch.int64)), "expert_map"),
    ("fused_experts", _experts_kwargs(topk_weights=torch.ones(3, 2)), "topk_weights"),
    ("dynamic_int8_quant", dict(x=_f(2, 3, 4)), "x"),
    ("dynamic_int8_quant", dict(x=torch.ones(2, 4, dtype=torch.int8)), "x"),
    ("int8_scaled_mm", _mm_kwargs(a=torch.ones(2, 4)), "a"),
    ("int8_scaled_mm", _mm_kwargs(b=torch.ones(3, 5, dtype=torch.int8)), "b"),
    ("int8_scaled_mm", _mm_kwargs(scale_a=torch.ones(2)), "scale_a"),
    ("int8_scaled_mm", _mm_kwargs(out_dtype=torch.int32), "out_dtype"),
    ("prepare_linear", dict(weight=_f(2, 3, 4)), "weight"),
    ("prepare_linear", dict(weight=torch.ones(3, 4, dtype=torch.int8)), "weight"),
    ("linear", dict(x=_f(2, 5), weight=_f(3, 4), bias=None, prepared=None), "weight"),
    ("linear", dict(x=_f(2, 4), weight=_f(3, 4), bias=_f(4), prepared=None), "bias"),
    ("linear", dict(x=_f(2, 4).double(), weight=_f(3, 4), bias=None, prepared=None), "weight"),
    ("linear", dict(x=torch.ones(2, 4, dtype=torch.int32), weight=_f(3, 4), bias=None, prepared=None), "x"),
    # fused ops (API 1.3): the reference binds their composites, whose primitives name the bad argument
    ("rope_and_write_kv_cache", dict(positions=torch.tensor([0, 1]), query=_f(2, 2, 8), key=_f(2, 2, 8),
                                     value=_f(2, 3, 8), cos_sin_cache=cos_sin_cache(4, 8).float(), head_size=8,
                                     rotary_dim=8, is_neox=True, kv_cache=torch.zeros(2, 4, 16, 2, 8),
                                     slot_mapping=torch.tensor([0, 1])), "value"),
    ("act_and_mul_linear", dict(x=_f(2, 8), weight=_f(3, 4), bias=None, prepared=None, activation="relu"),
     "activation"),
    ("act_and_mul_linear", dict(x=_f(2, 8), weight=_f(3, 5), bias=None, prepared=None, activation="silu"), "weight"),
]


@pytest.mark.parametrize(("op", "kwargs", "arg"), BAD_INPUTS,
                         ids=[f"{op}-{arg}-{i}" for i, (op, _, arg) in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_value_error_naming_the_argument(ops, op, kwargs, arg):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        getattr(ops, op)(**kwargs)


def test_every_op_has_a_bad_input_case():
    optional = set(getattr(accel_models.backends, "OPTIONAL_OPS", ()))  # backend-level hooks, no numeric op
    # the whole-layer ops' composites decline every input (None): the layer's own ops then check them
    declining = {"decoder_layer_decode", "moe_decoder_layer_decode"}
    assert {op for op, _, _ in BAD_INPUTS} == set(accel_models.backends.OP_NAMES) - optional - declining


def test_empty_batch(ops):
    """Zero tokens (e.g. a data-parallel rank with no requests running a dummy step) is not an error."""
    q, k = ops.rotary_embedding(positions=torch.zeros(0, dtype=torch.int64), query=_f(0, 32), key=_f(0, 2, 8),
                                cos_sin_cache=cos_sin_cache(8, 8).float(), head_size=8, rotary_dim=8, is_neox=False)
    assert q.shape == (0, 32) and k.shape == (0, 2, 8)
    cache = torch.zeros(2, 4, 16, 2, 8)
    ops.write_kv_cache(key=_f(0, 2, 8), value=_f(0, 2, 8), kv_cache=cache, slot_mapping=torch.zeros(0, dtype=torch.int64))
    out = ops.paged_attention(**_attn_kwargs(query=_f(0, 4, 8), block_table=torch.zeros(0, 1, dtype=_i32),
                                             seq_lens=torch.zeros(0, dtype=_i32), query_start_loc=torch.zeros(1, dtype=_i32),
                                             max_query_len=0, max_seq_len=0))
    assert out.shape == (0, 4, 8)
    w, ids = ops.moe_topk(**_topk_kwargs(router_logits=_f(0, 8)))
    assert w.shape == ids.shape == (0, 2)
    assert ops.fused_experts(**_experts_kwargs(hidden_states=_f(0, 8), topk_weights=torch.ones(0, 1),
                                               topk_ids=torch.zeros(0, 1, dtype=_i32))).shape == (0, 8)
    x_q, scales = ops.dynamic_int8_quant(x=_f(0, 8))
    assert x_q.shape == (0, 8) and scales.shape == (0, 1)
    assert ops.int8_scaled_mm(**_mm_kwargs(a=torch.ones(0, 4, dtype=torch.int8), scale_a=torch.ones(0, 1))).shape == (0, 3)
    assert ops.linear(x=_f(0, 4), weight=_f(3, 4), bias=None, prepared=None).shape == (0, 3)


def test_float64_stays_float64_and_on_the_input_device(ops):
    x = torch.randn(3, 5, dtype=torch.float64)
    assert ops.rms_norm(x=x, weight=torch.ones(5, dtype=torch.float64), eps=1e-6).dtype == torch.float64
    assert math.isfinite(float(ops.silu_and_mul(x=x[:, :4]).sum()))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 5000), seed=st.integers(0, 2**16), specials=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_argmax_matches_naive_first_maximum(ops, rows, cols, seed, specials, dtype):
    """API 1.6 argmax against a Python loop: ties (rounded values), NaN (the first wins), infinities and
    signed zeros (equal); only ``out`` is written and returned."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * 2).round()
    if specials:
        for v in (float("nan"), float("inf"), float("-inf"), -0.0, 0.0):
            x.view(-1)[torch.randint(0, rows * cols, (1 + rows * cols // 40,), generator=g)] = v
    x = x.to(dtype)
    buf = torch.full((rows + 1,), -1, dtype=torch.int64)
    res = ops.argmax(x=x, out=buf[:rows])
    assert res.data_ptr() == buf.data_ptr() and buf[rows] == -1
    assert buf[:rows].tolist() == naive.argmax(x.double().numpy())
