"""Every op of the NPU backend, run over the torch_npu EMULATION (CPU), against the reference backend.

The reference backend is an independent implementation of the hookspecs; it runs on float64 copies of the
inputs (the ground truth) unless a spec defines the computation at the input's precision (routing picks).
Each test also checks which torch_npu kernels the backend called, so a silent fallback is caught.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RTOL, NpuEnv, assert_close
from hypothesis import example, given
from hypothesis import strategies as st

import accel_backend_npu
from accel_backend_npu import emulation

DTYPES = [torch.float32, torch.bfloat16]
dtypes = st.sampled_from(DTYPES)


def _rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _no_fallback(op: str):
    before = accel_backend_npu.FALLBACKS[op]

    def check():
        assert accel_backend_npu.FALLBACKS[op] == before, f"{op} fell back to the reference implementation"

    return check


# ----------------------------------------------------------------------------------------------------
# normalization and activations
# ----------------------------------------------------------------------------------------------------

tokens = st.integers(1, 19)
hiddens = st.sampled_from([8, 64, 96, 136, 769 * 2])


@given(n=tokens, hidden=hiddens, dtype=dtypes, seed=st.integers(0, 2**16), strided=st.booleans())
def test_rms_norm(npu: NpuEnv, n, hidden, dtype, seed, strided):
    x = _rand((n, 2 * hidden), dtype, seed)[:, ::2] if strided else _rand((n, hidden), dtype, seed)
    w = _rand((hidden,), dtype, seed + 1)
    start = len(npu.emu.calls)
    out = npu.ops.rms_norm(x=x, weight=w, eps=1e-6)
    assert npu.calls_since(start) == ["npu_rms_norm"]
    assert out.dtype == dtype
    assert_close(out, npu.ref.rms_norm(x=x.double(), weight=w.double(), eps=1e-6), dtype, "rms_norm")


@given(n=tokens, hidden=hiddens, dtype=dtypes, seed=st.integers(0, 2**16))
def test_fused_add_rms_norm(npu: NpuEnv, n, hidden, dtype, seed):
    x, res, w = _rand((2, n, hidden), dtype, seed), _rand((2, n, hidden), dtype, seed + 1), _rand((hidden,), dtype, seed + 2)
    start = len(npu.emu.calls)
    out, res_out = npu.ops.fused_add_rms_norm(x=x.clone(), residual=res.clone(), weight=w, eps=1e-5)
    assert npu.calls_since(start) == ["npu_add_rms_norm"]
    ref_out, ref_res = npu.ref.fused_add_rms_norm(x=x.double(), residual=res.double(), weight=w.double(), eps=1e-5)
    assert_close(res_out, ref_res, dtype, "residual_out")
    # out normalizes the residual sum: compare with the float64 norm of the rounded sum the op returned
    assert_close(out, npu.ref.rms_norm(x=res_out.double(), weight=w.double(), eps=1e-5), dtype, "out")
    assert_close(out, ref_out, dtype, "out vs exact sum")


@given(n=tokens, d=st.sampled_from([4, 64, 300, 1000]), dtype=dtypes, seed=st.integers(0, 2**16),
       approximate=st.sampled_from(["none", "tanh"]))
def test_gated_activations(npu: NpuEnv, n, d, dtype, seed, approximate):
    x = _rand((n, 2 * d), dtype, seed, scale=2.0)
    start = len(npu.emu.calls)
    silu = npu.ops.silu_and_mul(x=x)
    gelu = npu.ops.gelu_and_mul(x=x, approximate=approximate)
    fused_gelu = 2 * d <= 1024
    assert npu.calls_since(start) == ["npu_swiglu"] + (["npu_gelu_mul"] if fused_gelu else [])
    assert_close(silu, npu.ref.silu_and_mul(x=x.double()), dtype, "silu_and_mul")
    assert_close(gelu, npu.ref.gelu_and_mul(x=x.double(), approximate=approximate), dtype, "gelu_and_mul")


def test_bad_input_is_a_value_error(npu: NpuEnv):
    with pytest.raises(ValueError, match="weight has shape"):
        npu.ops.rms_norm(x=torch.ones(2, 8), weight=torch.ones(4), eps=1e-6)
    with pytest.raises(ValueError, match="float64"):
        npu.ops.rms_norm(x=torch.ones(2, 8, dtype=torch.float64), weight=torch.ones(8, dtype=torch.float64), eps=1e-6)
    with pytest.raises(ValueError, match="approximate"):
        npu.ops.gelu_and_mul(x=torch.ones(2, 8), approximate="fast")
    with pytest.raises(ValueError, match="block_size"):
        npu.ops.allocate_kv_cache(num_blocks=4, block_size=16, num_kv_heads=1, head_size=64, dtype=torch.bfloat16,
                                  device=torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------
# rotary
# ----------------------------------------------------------------------------------------------------


def _cos_sin_cache(max_pos: int, rotary_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


@given(n=tokens, heads=st.integers(1, 4), kv_heads=st.integers(1, 2), head_size=st.sampled_from([64, 128]),
       partial=st.booleans(), is_neox=st.booleans(), dtype=dtypes, seed=st.integers(0, 2**16),
       three_d=st.booleans())
def test_rotary_embedding(npu: NpuEnv, n, heads, kv_heads, head_size, partial, is_neox, dtype, seed, three_d):
    rotary_dim = head_size // 2 if partial else head_size
    cache = _cos_sin_cache(4096, rotary_dim)
    positions = torch.randint(0, 4096, (n,), generator=torch.Generator().manual_seed(seed))
    q_shape = (n, heads, head_size) if three_d else (n, heads * head_size)
    k_shape = (n, kv_heads, head_size) if three_d else (n, kv_heads * head_size)
    q, k = _rand(q_shape, dtype, seed), _rand(k_shape, dtype, seed + 1)
    check = _no_fallback("rotary_embedding")
    start = len(npu.emu.calls)
    q_out, k_out = npu.ops.rotary_embedding(positions=positions, query=q.clone(), key=k.clone(), cos_sin_cache=cache,
                                            head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox)
    assert npu.calls_since(start) == ["npu_mrope"]
    check()
    rq, rk = npu.ref.rotary_embedding(positions=positions, query=q.double(), key=k.double(),
                                      cos_sin_cache=cache.double(), head_size=head_size, rotary_dim=rotary_dim,
                                      is_neox=is_neox)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert_close(q_out, rq, dtype, "query")
    assert_close(k_out, rk, dtype, "key")


def test_rotary_cases_without_a_fitting_kernel_fall_back(npu: NpuEnv):
    """No key, or rotary_dim not aligned for npu_mrope: the reference runs (and the result is right)."""
    cache = _cos_sin_cache(64, 16)
    positions = torch.arange(5)
    q = _rand((5, 2 * 64), torch.bfloat16, 0)
    before = accel_backend_npu.FALLBACKS["rotary_embedding"]
    start = len(npu.emu.calls)
    q_out, k_out = npu.ops.rotary_embedding(positions=positions, query=q, key=None, cos_sin_cache=cache, head_size=64,
                                            rotary_dim=16, is_neox=True)
    assert k_out is None and npu.calls_since(start) == []
    assert accel_backend_npu.FALLBACKS["rotary_embedding"] == before + 1
    rq, _ = npu.ref.rotary_embedding(positions=positions, query=q.double(), key=None, cos_sin_cache=cache.double(),
                                     head_size=64, rotary_dim=16, is_neox=True)
    assert_close(q_out, rq, torch.bfloat16, "query")


# ----------------------------------------------------------------------------------------------------
# paged KV cache and attention: mixed prefill / chunked prefill / decode batches, block size 128
# ----------------------------------------------------------------------------------------------------

BLOCK = 128


def _attention_case(specs, kv_heads, group, head_size, dtype, seed, padding_slots=0):
    """specs: [(context_len, query_len)]. Returns the pieces both backends need (K/V rounded to dtype)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(specs)
    need = [math.ceil(c / BLOCK) for c, _ in specs]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(need)
    block_table = torch.zeros((batch, max_blocks), dtype=torch.int32)
    keys, values, slots, queries = [], [], [], []
    used = 0
    for b, (ctx, q_len) in enumerate(specs):
        ids = perm[used: used + need[b]]
        used += need[b]
        block_table[b, : need[b]] = torch.tensor(ids, dtype=torch.int32)
        pos = torch.arange(ctx)
        slots.append(block_table[b, pos // BLOCK].long() * BLOCK + pos % BLOCK)
        keys.append(torch.randn((ctx, kv_heads, head_size), generator=g, dtype=torch.float64))
        values.append(torch.randn((ctx, kv_heads, head_size), generator=g, dtype=torch.float64))
        queries.append(torch.randn((q_len, kv_heads * group, head_size), generator=g, dtype=torch.float64))
    if padding_slots:  # tokens a captured graph pads with: slot -1, never to be written
        slots.append(torch.full((padding_slots,), -1, dtype=torch.long))
        keys.append(torch.full((padding_slots, kv_heads, head_size), 1e4, dtype=torch.float64))
        values.append(torch.full((padding_slots, kv_heads, head_size), -1e4, dtype=torch.float64))
    q_lens = torch.tensor([q for _, q in specs], dtype=torch.int32)
    return dict(
        key=torch.cat(keys).to(dtype), value=torch.cat(values).to(dtype), slot_mapping=torch.cat(slots),
        query=torch.cat(queries).to(dtype), block_table=block_table, num_blocks=num_blocks,
        seq_lens=torch.tensor([c for c, _ in specs], dtype=torch.int32),
        query_start_loc=torch.cat((torch.zeros(1, dtype=torch.int32), torch.cumsum(q_lens, 0).to(torch.int32))),
        max_query_len=int(q_lens.max()), max_seq_len=max(c for c, _ in specs),
    )


def _run_attention(npu: NpuEnv, case, kv_heads, head_size, dtype, window, soft_cap=None):
    cache = npu.ops.allocate_kv_cache(num_blocks=case["num_blocks"], block_size=BLOCK, num_kv_heads=kv_heads,
                                      head_size=head_size, dtype=dtype, device=torch.device("cpu"))
    npu.ops.write_kv_cache(key=case["key"], value=case["value"], kv_cache=cache, slot_mapping=case["slot_mapping"])
    args = dict(block_table=case["block_table"], seq_lens=case["seq_lens"], query_start_loc=case["query_start_loc"],
                max_query_len=case["max_query_len"], max_seq_len=case["max_seq_len"], scale=head_size ** -0.5,
                sliding_window=window, logits_soft_cap=soft_cap)
    start = len(npu.emu.calls)
    out = npu.ops.paged_attention(query=case["query"], kv_cache=cache, **args)
    called = npu.calls_since(start)
    ref_cache = npu.ref.allocate_kv_cache(num_blocks=case["num_blocks"], block_size=BLOCK, num_kv_heads=kv_heads,
                                          head_size=head_size, dtype=torch.float64, device=torch.device("cpu"))
    npu.ref.write_kv_cache(key=case["key"].double(), value=case["value"].double(), kv_cache=ref_cache,
                           slot_mapping=case["slot_mapping"])
    expected = npu.ref.paged_attention(query=case["query"].double(), kv_cache=ref_cache, **args)
    return out, expected, called


kinds = st.sampled_from(["decode", "prefill", "chunk"])


@st.composite
def batches(draw, min_size=1):
    specs = []
    for kind in draw(st.lists(kinds, min_size=min_size, max_size=4)):
        ctx = draw(st.integers(1, 3 * BLOCK + 5))
        q_len = 1 if kind == "decode" else ctx if kind == "prefill" else draw(st.integers(1, ctx))
        specs.append((ctx, q_len))
    return specs


@given(specs=batches(), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]),
       head_size=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       window=st.sampled_from([None, None, 1, 9, 150]), seed=st.integers(0, 2**16), padding=st.integers(0, 3))
@example(specs=[(300, 1), (200, 200), (260, 37), (1, 1)], kv_heads=2, group=4, head_size=128, dtype=torch.bfloat16,
         window=None, seed=1, padding=2)
@example(specs=[(300, 1), (200, 200), (260, 37)], kv_heads=1, group=2, head_size=64, dtype=torch.bfloat16,
         window=9, seed=2, padding=0)
def test_paged_attention_mixed_batches(npu: NpuEnv, specs, kv_heads, group, head_size, dtype, window, seed, padding):
    case = _attention_case(specs, kv_heads, group, head_size, dtype, seed, padding_slots=padding)
    before = accel_backend_npu.FALLBACKS["paged_attention"]
    out, expected, called = _run_attention(npu, case, kv_heads, head_size, dtype, window)
    max_q, max_s = case["max_query_len"], case["max_seq_len"]
    decode_only_window = window is not None and window < max_s and max_q <= 1
    fused = dtype != torch.float32 and not decode_only_window
    assert called == (["npu_fused_infer_attention_score"] if fused else []), called
    assert accel_backend_npu.FALLBACKS["paged_attention"] == before + (0 if fused else 1)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, f"paged_attention {specs} window={window}")


def test_paged_attention_soft_cap_runs_the_reference_on_the_same_cache(npu: NpuEnv):
    specs = [(130, 130), (70, 1)]
    case = _attention_case(specs, 2, 2, 64, torch.bfloat16, 5)
    before = accel_backend_npu.FALLBACKS["paged_attention"]
    out, expected, called = _run_attention(npu, case, 2, 64, torch.bfloat16, None, soft_cap=5.0)
    assert called == [] and accel_backend_npu.FALLBACKS["paged_attention"] == before + 1
    assert_close(out, expected, torch.bfloat16, "soft cap")


def test_sliding_window_pre_tokens_is_window_minus_one():
    """The wheel's docs define band masking as -pre_tokens <= j - i <= next_tokens, so a window of W tokens
    (the query itself included, as the hookspec and Hugging Face count) is pre_tokens = W - 1. Passing W
    (as vllm-ascend does) lets each query see one token too many: the emulation shows the difference."""
    specs, window, head_size = [(40, 40)], 4, 64
    case = _attention_case(specs, 1, 1, head_size, torch.bfloat16, 3)
    emu = emulation.TorchNpuEmulation(record_globally=False)  # direct calls, not the backend's
    flat = torch.zeros((case["num_blocks"] * BLOCK, 1, head_size), dtype=torch.bfloat16)
    emu.npu_scatter_nd_update_(flat, case["slot_mapping"].view(-1, 1), case["key"])
    vflat = torch.zeros_like(flat)
    emu.npu_scatter_nd_update_(vflat, case["slot_mapping"].view(-1, 1), case["value"])
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)

    def fia(pre_tokens):
        return emu.npu_fused_infer_attention_score(
            case["query"], flat.view(-1, BLOCK, head_size), vflat.view(-1, BLOCK, head_size), atten_mask=mask,
            block_table=case["block_table"], actual_seq_lengths=[40], actual_seq_lengths_kv=[40], num_heads=1,
            scale=head_size ** -0.5, pre_tokens=pre_tokens, next_tokens=0, input_layout="TND",
            num_key_value_heads=1, sparse_mode=4, block_size=BLOCK)[0]

    from accel_backend_reference import accel_paged_attention, accel_write_kv_cache
    ref_cache = torch.zeros((2, case["num_blocks"], BLOCK, 1, head_size), dtype=torch.float64)
    accel_write_kv_cache(key=case["key"].double(), value=case["value"].double(), kv_cache=ref_cache,
                         slot_mapping=case["slot_mapping"])
    expected = accel_paged_attention(query=case["query"].double(), kv_cache=ref_cache, block_table=case["block_table"],
                                     seq_lens=case["seq_lens"], query_start_loc=case["query_start_loc"],
                                     max_query_len=40, max_seq_len=40, scale=head_size ** -0.5,
                                     sliding_window=window, logits_soft_cap=None)
    assert_close(fia(window - 1), expected, torch.bfloat16, "pre_tokens = W - 1")
    assert (fia(window).double() - expected).abs().max() > 0.1  # one token too many is visibly wrong


def test_emulated_attention_refuses_a_wrong_mask_and_float32():
    emu = emulation.TorchNpuEmulation(record_globally=False)  # direct calls, not the backend's
    q = torch.zeros((3, 1, 64), dtype=torch.bfloat16)
    kv = torch.zeros((1, BLOCK, 64), dtype=torch.bfloat16)
    args = dict(block_table=torch.zeros((1, 1), dtype=torch.int32), actual_seq_lengths=[3], actual_seq_lengths_kv=[3],
                num_heads=1, input_layout="TND", sparse_mode=3, block_size=BLOCK)
    with pytest.raises(emulation.EmulatedKernelError, match="triu"):
        emu.npu_fused_infer_attention_score(q, kv, kv, atten_mask=torch.tril(torch.ones(2048, 2048, dtype=torch.bool)), **args)
    with pytest.raises(emulation.EmulatedKernelError, match="2048"):
        emu.npu_fused_infer_attention_score(q, kv, kv, atten_mask=torch.ones(3, 3, dtype=torch.bool), **args)
    with pytest.raises(emulation.EmulatedKernelError, match="float16/bfloat16|documents"):
        emu.npu_fused_infer_attention_score(q.float(), kv.float(), kv.float(),
                                            atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1), **args)


def test_write_kv_cache_skips_negative_slots(npu: NpuEnv):
    cache = npu.ops.allocate_kv_cache(num_blocks=2, block_size=BLOCK, num_kv_heads=1, head_size=64,
                                      dtype=torch.bfloat16, device=torch.device("cpu"))
    cache.zero_()
    key = torch.ones((3, 1, 64), dtype=torch.bfloat16)
    npu.ops.write_kv_cache(key=key, value=2 * key, kv_cache=cache, slot_mapping=torch.tensor([5, -1, 130]))
    assert cache.shape == (2, 3, BLOCK, 1, 64)  # two blocks plus the scratch block
    written = cache[:, :2].reshape(2, -1, 64).abs().sum(-1) > 0
    assert written[0].nonzero().flatten().tolist() == [5, 130] == written[1].nonzero().flatten().tolist()
    assert bool((cache[1, 0, 5] == 2).all())


# ----------------------------------------------------------------------------------------------------
# mixture of experts
# ----------------------------------------------------------------------------------------------------


@given(n=tokens, experts=st.sampled_from([4, 8, 16, 60]), top_k=st.integers(1, 4), renormalize=st.booleans(),
       dtype=dtypes, seed=st.integers(0, 2**16), scaling=st.sampled_from([1.0, 2.5]))
def test_moe_topk_softmax(npu: NpuEnv, n, experts, top_k, renormalize, dtype, seed, scaling):
    logits = _rand((n, experts), dtype, seed)
    args = dict(router_logits=logits, top_k=top_k, scoring_func="softmax", renormalize=renormalize,
                num_expert_group=None, topk_group=None, e_score_correction_bias=None, routed_scaling_factor=scaling)
    start = len(npu.emu.calls)
    w, ids = npu.ops.moe_topk(**args)
    assert npu.calls_since(start) == ["npu_moe_gating_top_k_softmax"]
    rw, rids = npu.ref.moe_topk(**args)  # the spec computes in float32 from the given logits
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids)
    assert_close(w, rw, torch.float32, "topk_weights")


@given(n=tokens, groups=st.sampled_from([(16, 4, 2), (32, 8, 3), (64, 8, 4), (12, 1, 1)]), top_k=st.integers(1, 4),
       scoring=st.sampled_from(["sigmoid", "softmax"]), use_bias=st.booleans(), renormalize=st.booleans(),
       dtype=dtypes, seed=st.integers(0, 2**16))
def test_moe_topk_grouped_and_biased(npu: NpuEnv, n, groups, top_k, scoring, use_bias, renormalize, dtype, seed):
    experts, num_groups, topk_group = groups
    logits = _rand((n, experts), dtype, seed)
    bias = _rand((experts,), torch.float32, seed + 1, scale=0.1) if use_bias else None
    args = dict(router_logits=logits, top_k=top_k, scoring_func=scoring, renormalize=renormalize,
                num_expert_group=num_groups if num_groups > 1 else None, topk_group=topk_group if num_groups > 1 else None,
                e_score_correction_bias=bias, routed_scaling_factor=2.5)
    start = len(npu.emu.calls)
    w, ids = npu.ops.moe_topk(**args)
    plain_softmax = scoring == "softmax" and num_groups == 1 and bias is None
    assert npu.calls_since(start) == ["npu_moe_gating_top_k_softmax" if plain_softmax else "npu_moe_gating_top_k"]
    rw, rids = npu.ref.moe_topk(**args)
    assert torch.equal(ids, rids)
    assert_close(w, rw, torch.float32, "topk_weights")


@given(n=st.integers(1, 24), experts=st.sampled_from([1, 4, 8]), top_k=st.integers(1, 3),
       hidden=st.sampled_from([32, 64]), inter=st.sampled_from([16, 48]), activation=st.sampled_from(["silu", "gelu"]),
       ep=st.booleans(), dtype=dtypes, seed=st.integers(0, 2**16))
def test_fused_experts(npu: NpuEnv, n, experts, top_k, hidden, inter, activation, ep, dtype, seed):
    top_k = min(top_k, experts * (2 if ep else 1))
    g = torch.Generator().manual_seed(seed)
    x = _rand((n, hidden), dtype, seed)
    w13 = _rand((experts, 2 * inter, hidden), dtype, seed + 1, scale=hidden ** -0.5)
    w2 = _rand((experts, hidden, inter), dtype, seed + 2, scale=inter ** -0.5)
    global_experts = experts * 2 if ep else experts
    ids = torch.stack([torch.randperm(global_experts, generator=g)[:top_k] for _ in range(n)]).to(torch.int32)
    weights = torch.rand((n, top_k), generator=g)
    expert_map = None
    if ep:  # this rank holds the odd global experts
        expert_map = torch.full((global_experts,), -1, dtype=torch.int32)
        expert_map[1::2] = torch.arange(experts, dtype=torch.int32)
    check = _no_fallback("fused_experts")
    start = len(npu.emu.calls)
    out = npu.ops.fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids,
                                activation=activation, expert_map=expert_map)
    check()
    act_kernel = "npu_swiglu" if activation == "silu" else "npu_gelu_mul"
    assert npu.calls_since(start) == ["npu_moe_init_routing", "npu_moe_compute_expert_tokens", "npu_grouped_matmul",
                                      act_kernel, "npu_grouped_matmul", "npu_moe_finalize_routing"]
    expected = npu.ref.fused_experts(hidden_states=x.double(), w13=w13.double(), w2=w2.double(), topk_weights=weights,
                                     topk_ids=ids, activation=activation, expert_map=expert_map)
    # bf16 rounds gate_up, the activation and each expert's output before the weighted sum
    assert_close(out, expected, dtype, "fused_experts", reduce=hidden if dtype == torch.float32 else 16)


# ----------------------------------------------------------------------------------------------------
# W8A8
# ----------------------------------------------------------------------------------------------------


@given(m=tokens, k=st.sampled_from([16, 64, 200]), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       seed=st.integers(0, 2**16), zero_row=st.booleans())
def test_dynamic_int8_quant(npu: NpuEnv, m, k, dtype, seed, zero_row):
    x = _rand((m, k), dtype, seed, scale=3.0)
    if zero_row:
        x[0] = 0
    start = len(npu.emu.calls)
    x_q, scales = npu.ops.dynamic_int8_quant(x=x)
    assert npu.calls_since(start) == ([] if dtype == torch.float32 else ["npu_dynamic_quant"])
    r_q, r_scales = npu.ref.dynamic_int8_quant(x=x)  # same input values: the spec's float32 formulation
    assert x_q.dtype == torch.int8 and scales.shape == (m, 1) and scales.dtype == torch.float32
    assert_close(scales, r_scales, torch.float32, "scales")
    assert int((x_q.int() - r_q.int()).abs().max()) <= 1  # the spec allows off-by-one at half-integers
    assert bool((x_q.int().abs() <= 127).all())


@given(m=tokens, n=st.sampled_from([8, 48]), k=st.sampled_from([16, 96]),
       out_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), use_bias=st.booleans(),
       seed=st.integers(0, 2**16), transposed_b=st.booleans())
def test_int8_scaled_mm(npu: NpuEnv, m, n, k, out_dtype, use_bias, seed, transposed_b):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8).t() if transposed_b else \
        torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale_a, scale_b = torch.rand((m, 1), generator=g) / 100, torch.rand((n,), generator=g) / 100
    bias = torch.randn((n,), generator=g) if use_bias else None
    start = len(npu.emu.calls)
    out = npu.ops.int8_scaled_mm(a=a, b=b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, bias=bias)
    assert npu.calls_since(start) == ([] if out_dtype == torch.float32 else ["npu_quant_matmul"])
    expected = npu.ref.int8_scaled_mm(a=a, b=b, scale_a=scale_a.double(), scale_b=scale_b.double(),
                                      out_dtype=torch.float64, bias=None if bias is None else bias.double())
    assert out.dtype == out_dtype
    assert_close(out, expected, out_dtype, "int8_scaled_mm", reduce=2 if use_bias else 1)


def test_tolerance_table_matches_design():
    assert RTOL == {torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
