"""Attention over the paged cache (against naive float64 attention), its delegation to an attention
factory, RMSNorm and SiluAndMul against naive math, and the simple runner's bookkeeping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accel_models import resolve_ops
from accel_models.context import BuildContext, ForwardContext, build_context, forward_context
from accel_models.layers import Attention, RMSNorm, SiluAndMul
from accel_models.runner import build_attn_metadata

OPS = resolve_ops("reference")


def _ctx(**kw):
    return build_context(BuildContext(ops=OPS, params_dtype=torch.float64, **kw))


def _naive_attention(q, k, v, scale, window, cap):
    """q [L, H, D] at positions 0..L-1 of one sequence with keys k, v [L, Hk, D]: causal, GQA."""
    L, H, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(H):
        kh, vh = k[:, h // group], v[:, h // group]
        for i in range(L):
            s = (kh[: i + 1] @ q[i, h]) * scale
            if cap:
                s = cap * torch.tanh(s / cap)
            if window:
                s[: max(0, i + 1 - window)] = float("-inf")
            out[i, h] = torch.softmax(s, 0) @ vh[: i + 1]
    return out


@pytest.mark.parametrize("window,cap", [(None, None), (3, None), (None, 5.0), (4, 2.0)])
def test_paged_attention_mixed_batch_matches_naive(window, cap):
    torch.manual_seed(0)
    H, Hk, D, bs = 4, 2, 8, 4
    lens = [9, 6, 1]
    seqs = [(torch.randn(n, H, D, dtype=torch.float64), torch.randn(n, Hk, D, dtype=torch.float64),
             torch.randn(n, Hk, D, dtype=torch.float64)) for n in lens]
    with _ctx():
        attn = Attention(H, D, D**-0.5, num_kv_heads=Hk, prefix="layers.0.attn", sliding_window=window,
                         logits_soft_cap=cap)
    cache = OPS.allocate_kv_cache(num_blocks=16, block_size=bs, num_kv_heads=Hk, head_size=D, dtype=torch.float64,
                                  device=torch.device("cpu"))
    tables = [[5, 2, 9], [0, 7], [11]]
    # step 1: prefill all but the last 2 tokens of seq 0 and all of seq 1 and 2 (ragged blocks)
    first = [lens[0] - 2, lens[1], lens[2]]
    md = build_attn_metadata(first, first, tables, bs)
    q = torch.cat([s[0][:n] for s, n in zip(seqs, first)]).flatten(1)
    k = torch.cat([s[1][:n] for s, n in zip(seqs, first)]).flatten(1)
    v = torch.cat([s[2][:n] for s, n in zip(seqs, first)]).flatten(1)
    with forward_context(ForwardContext(md, {"layers.0.attn": cache})):
        out1 = attn(q, k, v)
    # step 2: two decode steps of seq 0
    outs = []
    for pos in (lens[0] - 2, lens[0] - 1):
        md = build_attn_metadata([1], [pos + 1], [tables[0]], bs)
        with forward_context(ForwardContext(md, {"layers.0.attn": cache})):
            outs.append(attn(*(t[pos : pos + 1].flatten(1) for t in seqs[0])))
    ref = [_naive_attention(*s, D**-0.5, window, cap) for s in seqs]
    got0 = torch.cat((out1[: first[0]], *outs)).view(lens[0], H, D)
    torch.testing.assert_close(got0, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out1[first[0] : first[0] + lens[1]].view(lens[1], H, D), ref[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out1[-1:].view(1, H, D), ref[2], rtol=1e-12, atol=1e-12)


def test_padded_tokens_are_skipped_and_zero():
    H, D, bs = 2, 4, 4
    with _ctx():
        attn = Attention(H, D, 0.5, num_kv_heads=H, prefix="a")
    cache = OPS.allocate_kv_cache(num_blocks=2, block_size=bs, num_kv_heads=H, head_size=D, dtype=torch.float64,
                                  device=torch.device("cpu"))
    md = build_attn_metadata([3], [3], [[1]], bs, num_padded_tokens=5)
    q, k, v = (torch.randn(5, H * D, dtype=torch.float64) for _ in range(3))
    with forward_context(ForwardContext(md, {"a": cache})):
        out = attn(q, k, v)
    assert out.shape == (5, H * D) and not out[3:].any()
    ref = _naive_attention(q[:3].view(3, H, D), k[:3].view(3, H, D), v[:3].view(3, H, D), 0.5, None, None)
    torch.testing.assert_close(out[:3].view(3, H, D), ref, rtol=1e-12, atol=1e-12)


def test_attention_factory_builds_the_implementation_and_forward_delegates():
    calls = {}

    class Impl(nn.Module):
        def forward(self, q, k, v):
            calls["forward"] = (q.shape, k.shape, v.shape)
            return q * 2

    def factory(**kwargs):
        calls["init"] = kwargs
        return Impl()

    with _ctx(attention_factory=factory):
        attn = Attention(4, 8, 0.25, num_kv_heads=2, prefix="model.layers.3.self_attn.attn", sliding_window=16,
                         logits_soft_cap=30.0)
    assert calls["init"] == dict(num_heads=4, head_size=8, scale=0.25, num_kv_heads=2,
                                 prefix="model.layers.3.self_attn.attn", sliding_window=16, logits_soft_cap=30.0)
    q = torch.randn(3, 32)
    out = attn(q, torch.randn(3, 16), torch.randn(3, 16))  # no forward context needed: the impl owns its state
    assert torch.equal(out, q * 2) and calls["forward"] == ((3, 32), (3, 16), (3, 16))


def test_attention_errors_are_clear():
    with _ctx():
        with pytest.raises(ValueError, match="needs its prefix"):
            Attention(2, 4, 1.0)
        with pytest.raises(ValueError, match="multiple of num_kv_heads"):
            Attention(3, 4, 1.0, num_kv_heads=2, prefix="x")
        attn = Attention(2, 4, 1.0, prefix="x")
    md = build_attn_metadata([1], [1], [[0]], 16)
    with forward_context(ForwardContext(md, {"y": torch.empty(0)})):
        with pytest.raises(RuntimeError, match="no KV cache for attention layer 'x'"):
            attn(torch.randn(1, 8), torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="needs 3 blocks"):
        build_attn_metadata([1], [40], [[0, 1]], 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rms_norm_and_fused_residual(dtype):
    torch.manual_seed(1)
    with build_context(BuildContext(ops=OPS, params_dtype=dtype)):
        norm = RMSNorm(16, eps=1e-5, prefix="norm")
    norm.weight.data.uniform_(0.5, 1.5)
    x, res = torch.randn(3, 16, dtype=dtype), torch.randn(3, 16, dtype=dtype)

    def naive(t):  # HF Llama's order: normalize in float32 (float64 for float64), cast back, scale
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        tf = t.to(acc)
        return (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.weight

    torch.testing.assert_close(norm(x), naive(x), rtol=0, atol=0)
    out, new_res = norm(x, res)
    torch.testing.assert_close(new_res, x + res, rtol=0, atol=0)
    torch.testing.assert_close(out, naive(x + res), rtol=0, atol=0)


def test_silu_and_mul():
    with _ctx():
        act = SiluAndMul(prefix="act")
    x = torch.randn(4, 14, dtype=torch.float64)
    torch.testing.assert_close(act(x), F.silu(x[:, :7]) * x[:, 7:], rtol=1e-14, atol=1e-14)
