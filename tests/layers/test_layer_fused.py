"""The layers' use of the fused ops (API 1.3): Attention with its rotary (rope + KV write in one op call on
the paged path, a separate rotary before a delegate that owns the cache) and
RowParallelLinear.forward_act_and_mul (one act_and_mul_linear call, TP slices, all-reduce and bias as in
forward), each against naive float64 math written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accel_models import OpTable, resolve_ops
from accel_models.context import BuildContext, ForwardContext, ParallelGroup, build_context, forward_context
from accel_models.layers import Attention, RowParallelLinear, get_act_and_mul, get_rope
from accel_models.runner import build_attn_metadata

F64 = torch.float64


def spy_table(calls: list) -> OpTable:
    """The reference's table with every op call recorded by name (composites included)."""
    ops = resolve_ops("reference")

    def wrap(name, fn):
        def call(**kw):
            calls.append(name)
            return fn(**kw)
        return call

    functions = {name: wrap(name, getattr(ops, name)) for name in ops.providers}
    return OpTable(ops.backend, ops.info, functions, ops.providers, ops.strict)


class Group(ParallelGroup):
    """Rank ``rank`` of ``world``; all_reduce records its input and returns it (the test sums ranks itself)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world_size, self.reduced = rank, world, []

    def all_reduce(self, x):
        self.reduced.append(x.clone())
        return x


def _rope64(x, positions, rotary_dim, base=10000.0):
    """NeoX rotary of x [T, heads, D] in float64 from the formula (no cache); the angles in float32, as
    transformers computes them (so the layer's float32 frequencies match exactly)."""
    half = rotary_dim // 2
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    c, s = ang.cos().to(F64)[:, None, :], ang.sin().to(F64)[:, None, :]
    out = x.clone()
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    out[..., :half] = x1 * c - x2 * s
    out[..., half:rotary_dim] = x2 * c + x1 * s
    return out


def _naive_attention(q, k, v, scale):
    """One sequence, q/k/v [L, heads, D] at positions 0..L-1: causal, GQA."""
    L, H, _ = q.shape
    group = H // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(H):
        for i in range(L):
            p = torch.softmax((k[: i + 1, h // group] @ q[i, h]) * scale, 0)
            out[i, h] = p @ v[: i + 1, h // group]
    return out


def _build_attention(ops, rotary_dim, **ctx_kw):
    with build_context(BuildContext(ops=ops, params_dtype=F64, **ctx_kw)):
        rope = get_rope(8, rotary_dim, 64, {"rope_type": "default", "rope_theta": 10000.0}, dtype=F64, prefix="r")
        attn = Attention(4, 8, 8**-0.5, num_kv_heads=2, prefix="layers.0.attn", rotary_emb=rope)
    return attn


@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_attention_rotates_and_writes_the_cache_in_one_op_call(rotary_dim):
    calls: list = []
    ops = spy_table(calls)
    attn = _build_attention(ops, rotary_dim)
    g = torch.Generator().manual_seed(rotary_dim)
    L, bs = 6, 4
    qkv = torch.randn(L, (4 + 2 * 2) * 8, generator=g, dtype=F64)
    q, k, v = qkv.split([32, 16, 16], dim=-1)  # strided views, as LlamaAttention passes them
    q0, k0, v0 = (t.clone().view(L, -1, 8) for t in (q, k, v))
    cache = ops.allocate_kv_cache(num_blocks=4, block_size=bs, num_kv_heads=2, head_size=8, dtype=F64,
                                  device=torch.device("cpu"))
    calls.clear()
    positions = torch.arange(L)
    with forward_context(ForwardContext(build_attn_metadata([L], [L], [[3, 1]], bs), {"layers.0.attn": cache})):
        out = attn(q, k, v, positions)
    # one fused op call, then attention (no separate rotary or KV write from the layer)
    assert calls == ["rope_and_write_kv_cache", "paged_attention"]
    expect = _naive_attention(_rope64(q0, positions, rotary_dim), _rope64(k0, positions, rotary_dim), v0, 8**-0.5)
    torch.testing.assert_close(out.view(L, 4, 8), expect, rtol=1e-12, atol=1e-12)
    # a decode step reads the cache the fused call wrote
    q1, k1, v1 = (torch.randn(1, n, generator=g, dtype=F64) for n in (32, 16, 16))
    with forward_context(ForwardContext(build_attn_metadata([1], [L + 1], [[3, 1]], bs), {"layers.0.attn": cache})):
        out1 = attn(q1, k1, v1, torch.tensor([L]))
    pos = torch.arange(L + 1)
    full_q = _rope64(torch.cat((q0, q1.view(1, 4, 8))), pos, rotary_dim)
    full_k = _rope64(torch.cat((k0, k1.view(1, 2, 8))), pos, rotary_dim)
    full_v = torch.cat((v0, v1.view(1, 2, 8)))
    torch.testing.assert_close(out1.view(1, 4, 8), _naive_attention(full_q, full_k, full_v, 8**-0.5)[-1:],
                               rtol=1e-12, atol=1e-12)


def test_attention_with_a_delegate_rotates_first_and_never_writes_a_cache():
    """The vLLM adapter's path: its attention owns the cache, so the rotary runs alone, before it."""
    seen = {}

    class Impl(nn.Module):
        def forward(self, q, k, v):
            seen["q"], seen["k"] = q.clone(), k.clone()
            return q

    calls: list = []
    attn = _build_attention(spy_table(calls), 8, attention_factory=lambda **kw: Impl())
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, n, generator=g, dtype=F64) for n in (32, 16, 16))
    positions = torch.tensor([4, 9, 2])
    eq, ek = _rope64(q.view(3, 4, 8), positions, 8), _rope64(k.view(3, 2, 8), positions, 8)
    calls.clear()
    attn(q.clone(), k.clone(), v, positions)  # no forward context: the delegate owns its state
    assert calls == ["rotary_embedding"]
    torch.testing.assert_close(seen["q"].view(3, 4, 8), eq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen["k"].view(3, 2, 8), ek, rtol=1e-12, atol=1e-12)


def test_attention_rotary_errors_are_clear():
    attn = _build_attention(resolve_ops("reference"), 8)
    with pytest.raises(ValueError, match="needs positions"):
        attn(torch.randn(1, 32), torch.randn(1, 16), torch.randn(1, 16))
    with build_context(BuildContext(ops=resolve_ops("reference"))):
        rope = get_rope(16, 16, 64, {"rope_type": "default", "rope_theta": 10000.0}, prefix="r")
        with pytest.raises(ValueError, match="rotary_emb has head_size 16, the layer 8"):
            Attention(4, 8, 1.0, prefix="x", rotary_emb=rope)


def _act64(x, activation):
    g, u = x.chunk(2, dim=-1)
    if activation == "silu":
        return g / (1 + torch.exp(-g)) * u
    if activation == "gelu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2))) * u
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u


@pytest.mark.parametrize("hidden_act, activation", [("silu", "silu"), ("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_activation_modules_name_their_fused_activation(hidden_act, activation):
    with build_context(BuildContext(ops=resolve_ops("reference"))):
        assert get_act_and_mul(hidden_act).activation == activation


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("input_is_parallel", [True, False])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_row_parallel_forward_act_and_mul_sums_to_the_full_product(world, input_is_parallel, activation):
    g = torch.Generator().manual_seed(world)
    inter, hidden = 12, 5
    w, b = torch.randn(hidden, inter, generator=g, dtype=F64), torch.randn(hidden, generator=g, dtype=F64)
    x = torch.randn(2, 3, 2 * inter, generator=g, dtype=F64)  # [gate | up] of the whole intermediate
    total = torch.zeros(2, 3, hidden, dtype=F64)
    n = inter // world
    for r in range(world):
        calls: list = []
        group = Group(r, world)
        with build_context(BuildContext(ops=spy_table(calls), tp_group=group, params_dtype=F64)):
            layer = RowParallelLinear(inter, hidden, bias=True, input_is_parallel=input_is_parallel, prefix="down")
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        layer.process_weights_after_loading()
        gate, up = x.chunk(2, dim=-1)
        mine = torch.cat((gate[..., r * n:(r + 1) * n], up[..., r * n:(r + 1) * n]), -1)
        calls.clear()
        out, out_bias = layer.forward_act_and_mul(mine if input_is_parallel else x, activation)
        assert calls[0] == "act_and_mul_linear" and out_bias is None
        partial = _act64(mine, activation) @ w[:, r * n:(r + 1) * n].T
        if world > 1:  # reduced once, before the bias (added once, after the reduction)
            assert len(group.reduced) == 1
            torch.testing.assert_close(group.reduced[0], partial, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, partial + b, rtol=1e-12, atol=1e-12)
        total += out - b
    torch.testing.assert_close(total + b, F.linear(_act64(x, activation), w, b), rtol=1e-12, atol=1e-12)


def test_row_parallel_forward_act_and_mul_skip_bias_add():
    with build_context(BuildContext(ops=resolve_ops("reference"), params_dtype=F64)):
        layer = RowParallelLinear(4, 3, bias=True, skip_bias_add=True, prefix="down")
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 8, dtype=F64)
    out, bias = layer.forward_act_and_mul(x, "gelu")
    assert bias is layer.bias
    torch.testing.assert_close(out, _act64(x, "gelu") @ layer.weight.detach().T, rtol=1e-12, atol=1e-12)
