"""Hypothesis strategies for the conformance kit: one per op, drawing realistic case descriptions.

A case is a plain dict of sizes and flags plus a ``seed``; :mod:`accel_models.testing.checks` turns it
into tensors. Keeping cases as small dicts makes failures shrink quickly and print readably.
"""

from __future__ import annotations

from hypothesis import strategies as st

#: hidden sizes seen in practice plus odd ones (vLLM's layer tests use 769 and 5125 for the same reason)
HIDDEN = [16, 17, 64, 127, 256, 769, 1000, 2048, 4096, 5125]
HEAD_SIZES = [32, 64, 80, 96, 128]


def _seed() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


@st.composite
def norm_cases(draw, quick: bool = False):
    hidden = draw(st.sampled_from(HIDDEN[:6] if quick else HIDDEN))
    return {
        "leading": draw(st.sampled_from([(1,), (7,), (33,), (2, 5)] if quick else [(1,), (7,), (33,), (2, 5), (257,)])),
        "hidden": hidden,
        "eps": draw(st.sampled_from([1e-5, 1e-6])),
        "noncontig": draw(st.booleans()),
        "seed": draw(_seed()),
    }


@st.composite
def act_cases(draw, quick: bool = False):
    return {
        "tokens": draw(st.integers(1, 40 if quick else 300)),
        "d": draw(st.sampled_from([1, 7, 64, 127, 1376, 2816] if not quick else [1, 7, 64, 127])),
        "approximate": draw(st.sampled_from(["none", "tanh"])),
        "noncontig": draw(st.booleans()),
        "seed": draw(_seed()),
    }


@st.composite
def rotary_cases(draw, quick: bool = False):
    head_size = draw(st.sampled_from(HEAD_SIZES))
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    return {
        "tokens": draw(st.integers(1, 32 if quick else 200)),
        "num_heads": kv_heads * draw(st.sampled_from([1, 2, 4, 7])),
        "num_kv_heads": kv_heads,
        "head_size": head_size,
        "rotary_dim": draw(st.sampled_from([head_size, head_size // 2, head_size // 4 * 2])),
        "is_neox": draw(st.booleans()),
        "with_key": draw(st.sampled_from([True, True, False])),
        "three_d": draw(st.booleans()),
        "max_position": 4096,
        "seed": draw(_seed()),
    }


@st.composite
def attention_cases(draw, block_sizes: tuple[int, ...] = (16,), quick: bool = False):
    max_ctx = 160 if quick else 2100
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    batch = draw(st.integers(1, 4 if quick else 8))
    seqs = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["decode", "prefill", "chunked"]))
        ctx = draw(st.integers(1, max_ctx)) if kind != "prefill" else draw(st.integers(1, min(max_ctx, 300)))
        if kind == "decode":
            q = 1
        elif kind == "prefill":
            q = ctx
        else:
            q = draw(st.integers(1, min(ctx, 64)))
        seqs.append((ctx, q))
    return {
        "seqs": seqs,
        "num_heads": kv_heads * draw(st.sampled_from([1, 2, 4, 8])),
        "num_kv_heads": kv_heads,
        "head_size": draw(st.sampled_from(HEAD_SIZES)),
        "block_size": draw(st.sampled_from(list(block_sizes))),
        "sliding_window": draw(st.one_of(st.none(), st.integers(1, 64))),
        "logits_soft_cap": draw(st.sampled_from([None, None, 30.0, 5.0])),
        "seed": draw(_seed()),
    }


@st.composite
def moe_topk_cases(draw, quick: bool = False):
    grouped = draw(st.booleans())
    if grouped:
        groups = draw(st.sampled_from([2, 4, 8]))
        per_group = draw(st.sampled_from([4, 8, 32]))
        experts = groups * per_group
        topk_group = draw(st.integers(1, groups))
        top_k = draw(st.integers(1, min(8, topk_group * per_group)))
    else:
        groups = topk_group = None
        experts = draw(st.sampled_from([8, 16, 60, 64, 128]))
        top_k = draw(st.integers(1, 8))
    return {
        "tokens": draw(st.integers(1, 64 if quick else 512)),
        "num_experts": experts,
        "top_k": top_k,
        "scoring_func": draw(st.sampled_from(["softmax", "sigmoid"])),
        "renormalize": draw(st.booleans()),
        "num_expert_group": groups,
        "topk_group": topk_group,
        "bias": draw(st.booleans()) if grouped else False,
        "routed_scaling_factor": draw(st.sampled_from([1.0, 2.5])),
        "seed": draw(_seed()),
    }


@st.composite
def argmax_cases(draw, quick: bool = False):
    return {
        "rows": draw(st.integers(1, 9 if quick else 80)),
        "cols": draw(st.sampled_from([1, 7, 300, 4096, 4097, 32000] if quick else [1, 7, 300, 4096, 4097, 32000, 128256])),
        "ties": draw(st.booleans()),
        "special": draw(st.booleans()),
        "noncontig": draw(st.booleans()),
        "seed": draw(_seed()),
    }


@st.composite
def fused_experts_cases(draw, quick: bool = False):
    experts = draw(st.sampled_from([1, 4, 8, 60] if not quick else [1, 4, 8]))
    return {
        "tokens": draw(st.integers(1, 48 if quick else 256)),
        "hidden": draw(st.sampled_from([16, 33, 64, 256] if quick else [16, 33, 64, 256, 1000])),
        "intermediate": draw(st.sampled_from([8, 27, 64, 96])),
        "num_experts": experts,
        "top_k": draw(st.integers(1, min(experts, 8))),
        "activation": draw(st.sampled_from(["silu", "silu", "gelu"])),
        "ep": draw(st.booleans()) and experts > 1,
        "seed": draw(_seed()),
    }


@st.composite
def linear_cases(draw, quick: bool = False):
    return {
        "m": draw(st.sampled_from([1, 2, 7, 16, 64] if quick else [1, 2, 3, 7, 16, 33, 64, 300])),
        "k": draw(st.sampled_from([1, 16, 33, 128, 512] if quick else [1, 16, 33, 128, 512, 1000])),
        "n": draw(st.sampled_from([1, 8, 31, 256, 1000])),
        "bias": draw(st.booleans()),
        "batched": draw(st.booleans()),  # x [1, m, k] instead of [m, k]
        "noncontig": draw(st.booleans()),  # the weight a strided view
        "prepare": draw(st.booleans()),  # prepared= from prepare_linear, else None
        "seed": draw(_seed()),
    }


@st.composite
def rope_kv_cases(draw, block_sizes: tuple[int, ...] = (16,), quick: bool = False):
    """rope_and_write_kv_cache (API 1.3): rotary cases plus a cache, padding slots and strided q/k/v."""
    head_size = draw(st.sampled_from(HEAD_SIZES))
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    return {
        "tokens": draw(st.integers(1, 24 if quick else 160)),
        "num_heads": kv_heads * draw(st.sampled_from([1, 2, 4, 7])),
        "num_kv_heads": kv_heads,
        "head_size": head_size,
        "rotary_dim": draw(st.sampled_from([head_size, head_size // 2, head_size // 4 * 2])),
        "is_neox": draw(st.booleans()),
        "strided": draw(st.booleans()),  # q, k, v as views of one [T, (H + 2 Hk) D] qkv buffer
        "padding": draw(st.sampled_from([0, 1, 3])),  # tokens with slot -1 (rotated, not written)
        "block_size": draw(st.sampled_from(list(block_sizes))),
        "max_position": 4096,
        "seed": draw(_seed()),
    }


@st.composite
def decoder_layer_cases(draw, block_sizes: tuple[int, ...] = (16,), quick: bool = False):
    """decoder_layer_decode (API 1.4): a small dense layer, a cached context, one or two decode tokens."""
    head_size = draw(st.sampled_from([32, 64]))
    kv_heads = draw(st.sampled_from([1, 2]))
    return {
        "tokens": draw(st.sampled_from([1, 1, 2])),  # one sequence (what kernels fuse) or two
        "hidden": draw(st.sampled_from([64, 96])),
        "intermediate": draw(st.sampled_from([96, 128])),
        "num_heads": kv_heads * draw(st.sampled_from([1, 2, 4])),
        "num_kv_heads": kv_heads,
        "head_size": head_size,
        "is_neox": draw(st.booleans()),
        "first_layer": draw(st.booleans()),  # residual None
        "context": draw(st.integers(0, 40 if quick else 150)),  # cached tokens before the new one
        "block_size": draw(st.sampled_from(list(block_sizes))),
        "seed": draw(_seed()),
    }


@st.composite
def moe_decoder_layer_cases(draw, block_sizes: tuple[int, ...] = (16,), quick: bool = False):
    """moe_decoder_layer_decode (API 1.5): decoder_layer_cases' attention, then E experts of intermediate I
    (the case's ``intermediate``), top_k of them, renormalized or not."""
    case = draw(decoder_layer_cases(block_sizes=block_sizes, quick=quick))
    experts = draw(st.sampled_from([2, 4, 6, 8]))
    case.update(intermediate=draw(st.sampled_from([32, 48, 64])), num_experts=experts,
                top_k=draw(st.integers(1, min(experts, 3))), renormalize=draw(st.booleans()))
    return case


@st.composite
def act_linear_cases(draw, quick: bool = False):
    """act_and_mul_linear (API 1.3): linear cases over a gated input ``[..., 2 k]``."""
    return {
        "m": draw(st.sampled_from([1, 2, 7, 16, 64] if quick else [1, 2, 3, 7, 16, 33, 64, 300])),
        "k": draw(st.sampled_from([1, 16, 33, 128, 512] if quick else [1, 16, 33, 128, 512, 1000])),
        "n": draw(st.sampled_from([1, 8, 31, 256, 1000])),
        "activation": draw(st.sampled_from(["silu", "silu", "gelu", "gelu_tanh"])),
        "bias": draw(st.booleans()),
        "batched": draw(st.booleans()),  # x [1, m, 2k] instead of [m, 2k]
        "noncontig": draw(st.booleans()),  # x a strided view
        "prepare": draw(st.booleans()),  # prepared= from prepare_linear, else None
        "seed": draw(_seed()),
    }


@st.composite
def quant_cases(draw, quick: bool = False):
    return {
        "m": draw(st.integers(1, 64 if quick else 300)),
        "k": draw(st.sampled_from([1, 16, 33, 128, 1000])),
        "n": draw(st.sampled_from([1, 8, 31, 256])),
        "bias": draw(st.booleans()),
        "zero_row": draw(st.booleans()),
        "seed": draw(_seed()),
    }
