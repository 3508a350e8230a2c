"""Fused ops (API 1.3) and their composites: binding rules, overrides, strict mode, tracing, and the
composites' numbers against naive float64 loops (tests/reference/_naive_ops.py, no torch).

Throwaway backends are module objects holding hookimpls that delegate to the reference and record every
call, so a test sees which table's primitive a composite called.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import accel_backend_reference
import accel_models
from accel_models import BackendError, BackendInfo, hookimpl
from accel_models import backends as B

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
import _naive_ops as naive  # noqa: E402

ENV_VARS = ("ACCEL_BACKEND", "ACCEL_OPS", "ACCEL_STRICT", "ACCEL_PLUGINS", "ACCEL_PLUGINS_BLOCK", "ACCEL_TRACE")
KV = B.KV_CACHE_GROUP
LIN = B.LINEAR_GROUP


@pytest.fixture
def registry(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCEL_PLUGINS", "reference")  # only the throwaway backends compete
    B.reset_registry()
    yield B.get_registry()
    B.reset_registry()


def _impl(name: str, op: str, calls: list, body=None):
    params = B._SPEC_PARAMS[op]
    target = body or getattr(accel_backend_reference, f"accel_{op}", None)

    def record(**kwargs):
        calls.append((name, op))
        return target(**kwargs)

    src = f"def accel_{op}({', '.join(params)}):\n    return _record({', '.join(f'{p}={p}' for p in params)})\n"
    ns: dict = {"_record": record}
    exec(src, ns)
    return hookimpl(ns[f"accel_{op}"])


def backend(name: str, ops, calls: list, **bodies) -> types.ModuleType:
    """A backend implementing ``ops`` (the reference's code, each call recorded in ``calls`` as (name, op));
    ``bodies`` gives the code of the fused ops it implements natively."""
    mod = types.ModuleType(f"throwaway_{name}")
    mod.accel_backend_info = hookimpl(lambda: BackendInfo(name=name, device_type="cpu", available=True, reason=None))
    for op in ops:
        setattr(mod, f"accel_{op}", _impl(name, op, calls, bodies.get(op)))
    for op, body in bodies.items():
        if op not in ops:
            setattr(mod, f"accel_{op}", _impl(name, op, calls, body))
    accel_models.register_backend(mod, name)
    return mod


def _native_rope(**kw):  # a "native" fused op: the reference's composite, as a backend's own code would compute it
    return accel_models.resolve_ops("reference").rope_and_write_kv_cache(**kw)


def _native_act(**kw):
    return accel_models.resolve_ops("reference").act_and_mul_linear(**kw)


def _rope_case(dtype=torch.float64, block_size=4, tokens=5, heads=4, kv_heads=2, head=8, rotary_dim=8,
               is_neox=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head, generator=g, dtype=torch.float64).to(dtype)
    q, k, v = qkv.split([heads * head, kv_heads * head, kv_heads * head], dim=-1)  # strided views, as layers pass
    positions = torch.randint(0, 32, (tokens,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    ang = torch.arange(32, dtype=torch.float64)[:, None] * inv[None, :]
    cache_cs = torch.cat((ang.cos(), ang.sin()), -1).to(dtype)
    num_blocks = 4
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[1] = -1  # padding: rotated, not written
    kv_cache = torch.full((2, num_blocks, block_size, kv_heads, head), 7.0, dtype=dtype)  # the reference layout
    return dict(positions=positions, query=q.view(tokens, heads, head), key=k.view(tokens, kv_heads, head),
                value=v.view(tokens, kv_heads, head), cos_sin_cache=cache_cs, head_size=head, rotary_dim=rotary_dim,
                is_neox=is_neox, kv_cache=kv_cache, slot_mapping=slots)


def _expect_rope(case):
    """Naive float64: rotated q and k, and the cache the write must leave (reference layout)."""
    npf = lambda t: t.detach().to(torch.float64).numpy().copy()  # noqa: E731
    args = (case["positions"].numpy(), )
    cs = npf(case["cos_sin_cache"])
    q = naive.rotary(args[0], npf(case["query"]), cs, case["head_size"], case["rotary_dim"], case["is_neox"])
    k = naive.rotary(args[0], npf(case["key"]), cs, case["head_size"], case["rotary_dim"], case["is_neox"])
    cache = npf(case["kv_cache"])
    bs = cache.shape[2]
    v = npf(case["value"])
    for t, slot in enumerate(case["slot_mapping"].tolist()):
        if slot >= 0:
            cache[0, slot // bs, slot % bs] = k[t]
            cache[1, slot // bs, slot % bs] = v[t]
    return q, k, cache


# ----------------------------------------------------------------------------------------------------
# binding
# ----------------------------------------------------------------------------------------------------


def test_a_backend_without_fused_ops_gets_composites_of_its_own_primitives(registry):
    calls: list = []
    backend("dev", B.PRIMITIVE_OPS, calls)
    ops = accel_models.resolve_ops("dev")
    assert ops.providers["rope_and_write_kv_cache"] == ops.providers["act_and_mul_linear"] == B.COMPOSITE
    assert sorted(ops.composites) == sorted(B.COMPOSITE_OPS) and ops.fallbacks == []
    assert "composites=" in repr(ops)
    case = _rope_case()
    ops.rope_and_write_kv_cache(**case)
    assert calls == [("dev", "rotary_embedding"), ("dev", "write_kv_cache")]  # this table's, never the reference's
    calls.clear()
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    for act, prim in (("silu", "silu_and_mul"), ("gelu", "gelu_and_mul"), ("gelu_tanh", "gelu_and_mul")):
        ops.act_and_mul_linear(x=x, weight=w, bias=None, prepared=None, activation=act)
        assert calls == [("dev", prim), ("dev", "linear")]
        calls.clear()


def test_native_fused_ops_are_bound_where_the_backend_provides_every_op_they_fuse(registry):
    calls: list = []
    mod = backend("fast", B.PRIMITIVE_OPS, calls, rope_and_write_kv_cache=_native_rope, act_and_mul_linear=_native_act)
    ops = accel_models.resolve_ops("fast", strict=True)
    assert ops.providers["rope_and_write_kv_cache"] == ops.providers["act_and_mul_linear"] == "fast"
    assert ops.rope_and_write_kv_cache is mod.accel_rope_and_write_kv_cache
    assert ops.composites == ["decoder_layer_decode", "moe_decoder_layer_decode"]  # not in "fast": they decline
    ops.rope_and_write_kv_cache(**_rope_case())
    assert calls == [("fast", "rope_and_write_kv_cache")]


@pytest.mark.parametrize("missing, fused", [("allocate_kv_cache", "rope_and_write_kv_cache"),
                                            ("prepare_linear", "act_and_mul_linear")])
def test_group_fallback_forces_the_composite(registry, missing, fused):
    """A native fused op writes its own backend's cache layout / reads its own prepared weight: when that
    backend's group falls back to the reference, the composite (over the reference's group) is bound."""
    calls: list = []
    backend("partial", [op for op in B.PRIMITIVE_OPS if op != missing], calls,
            rope_and_write_kv_cache=_native_rope, act_and_mul_linear=_native_act)
    ops = accel_models.resolve_ops("partial")
    group = KV if fused == "rope_and_write_kv_cache" else LIN
    assert {ops.providers[op] for op in group} == {"reference"}
    assert ops.providers[fused] == B.COMPOSITE
    other = next(op for op in B.COMPOSITE_OPS if op != fused)
    assert ops.providers[other] == "partial"  # the other fused op is unaffected
    if fused == "rope_and_write_kv_cache":
        case = _rope_case()
        q, k = ops.rope_and_write_kv_cache(**case)
        assert calls == [("partial", "rotary_embedding")]  # the write went to the reference (unrecorded)
        eq, ek, ecache = _expect_rope(case)
        np.testing.assert_allclose(case["kv_cache"].numpy(), ecache, rtol=1e-12, atol=1e-12)


def test_overriding_a_fused_op_primitive_moves_it_to_the_composite(registry, monkeypatch):
    calls: list = []
    backend("fast", B.PRIMITIVE_OPS, calls, rope_and_write_kv_cache=_native_rope, act_and_mul_linear=_native_act)
    monkeypatch.setenv("ACCEL_OPS", "rotary_embedding=reference,silu_and_mul=reference")
    ops = accel_models.resolve_ops("fast")
    assert ops.providers["rope_and_write_kv_cache"] == ops.providers["act_and_mul_linear"] == B.COMPOSITE
    ops.rope_and_write_kv_cache(**_rope_case())
    assert calls == [("fast", "write_kv_cache")]  # the override's rotary, the backend's own KV write


def test_fused_op_overrides(registry, monkeypatch):
    calls: list = []
    backend("fast", B.PRIMITIVE_OPS, calls, rope_and_write_kv_cache=_native_rope, act_and_mul_linear=_native_act)
    backend("plain", B.PRIMITIVE_OPS, calls)
    monkeypatch.setenv("ACCEL_OPS", "act_and_mul_linear=composite")
    ops = accel_models.resolve_ops("fast")
    assert ops.providers["act_and_mul_linear"] == B.COMPOSITE and ops.providers["rope_and_write_kv_cache"] == "fast"
    # a native fused op from another backend than the ops it fuses: refused, with what to do
    monkeypatch.setenv("ACCEL_OPS", "rope_and_write_kv_cache=fast")
    with pytest.raises(BackendError, match=r"rope_and_write_kv_cache=fast.*override those to 'fast' too.*composite"):
        accel_models.resolve_ops("plain")
    # ...accepted when its rotary and KV group come from that backend too
    monkeypatch.setenv("ACCEL_OPS", "rope_and_write_kv_cache=fast,rotary_embedding=fast,paged_attention=fast")
    ops = accel_models.resolve_ops("plain")
    assert ops.providers["rope_and_write_kv_cache"] == "fast"
    monkeypatch.setenv("ACCEL_OPS", "act_and_mul_linear=plain")
    with pytest.raises(BackendError, match="'plain' does not implement act_and_mul_linear.*=composite"):
        accel_models.resolve_ops("fast")
    monkeypatch.setenv("ACCEL_OPS", "rms_norm=composite")
    with pytest.raises(BackendError, match="only the fused ops"):
        accel_models.resolve_ops("fast")


def test_strict_mode_does_not_require_fused_ops(registry):
    calls: list = []
    backend("api12", [op for op in B.PRIMITIVE_OPS if op not in B.OPTIONAL_OPS], calls)  # written for API 1.2
    ops = accel_models.resolve_ops("api12", strict=True)
    assert ops.fallbacks == [] and sorted(ops.composites) == sorted(B.COMPOSITE_OPS)
    backend("few", ["rms_norm"], calls)
    with pytest.raises(BackendError, match="strict mode") as err:
        accel_models.resolve_ops("few", strict=True)
    assert "rope_and_write_kv_cache" not in str(err.value) and "act_and_mul_linear" not in str(err.value)


def test_the_name_composite_is_reserved(registry):
    calls: list = []
    rec = B.get_registry().register(types.SimpleNamespace(accel_backend_info=hookimpl(
        lambda: BackendInfo(name="composite", device_type="cpu", available=True, reason=None))), "composite")
    assert not rec.usable and "reserved" in rec.reason
    del calls


def test_trace_logs_the_composite_and_its_primitives(registry, monkeypatch, caplog):
    monkeypatch.setenv("ACCEL_TRACE", "1")
    ops = accel_models.resolve_ops("reference")
    with caplog.at_level(logging.INFO, logger="accel_models.backends"):
        ops.act_and_mul_linear(x=torch.randn(2, 8), weight=torch.randn(3, 4), bias=None, prepared=None,
                               activation="silu")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("act_and_mul_linear [composite]" in m for m in msgs)
    assert any("silu_and_mul [reference]" in m for m in msgs) and any("linear [reference]" in m for m in msgs)


def test_ops_cli_shows_composites(registry, capsys):
    from accel_models.cli import main

    calls: list = []
    backend("fast", B.PRIMITIVE_OPS, calls, act_and_mul_linear=_native_act)
    assert main(["ops", "--backend", "fast"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("rope_", "act_"))}
    names = out.splitlines()[0].split()[1:]
    assert rows["act_and_mul_linear"][names.index("fast")] == "native"
    assert rows["act_and_mul_linear"][names.index("reference")] == "composite"
    assert rows["rope_and_write_kv_cache"][names.index("fast")] == "composite"
    assert "act_and_mul_linear=fast" in out and "rope_and_write_kv_cache=composite" in out


# ----------------------------------------------------------------------------------------------------
# the composites' numbers (the reference's table) against naive float64 loops
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_neox, rotary_dim", [(True, 8), (False, 8), (True, 4), (False, 6)])
def test_rope_and_write_kv_cache_composite_matches_naive(is_neox, rotary_dim):
    ops = accel_models.resolve_ops("reference")
    case = _rope_case(is_neox=is_neox, rotary_dim=rotary_dim, seed=rotary_dim)
    value_before = case["value"].clone()
    eq, ek, ecache = _expect_rope(case)
    q, k = ops.rope_and_write_kv_cache(**case)
    assert q.shape == case["query"].shape and k.shape == case["key"].shape
    np.testing.assert_allclose(q.numpy(), eq, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(k.numpy(), ek, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(case["kv_cache"].numpy(), ecache, rtol=1e-12, atol=1e-12)  # slot -1 untouched
    assert torch.equal(case["value"], value_before)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_act_and_mul_linear_composite_matches_naive(activation, bias):
    ops = accel_models.resolve_ops("reference")
    g = torch.Generator().manual_seed(len(activation))
    wide = torch.randn(2, 3, 2 * 2 * 6 + 1, generator=g, dtype=torch.float64)
    x = wide[..., 1::2][..., :12]  # strided [2, 3, 12]
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    out = ops.act_and_mul_linear(x=x, weight=w, bias=b, prepared=ops.prepare_linear(weight=w), activation=activation)
    act = naive.silu if activation == "silu" else (lambda v: naive.gelu(v, "tanh" if activation == "gelu_tanh" else "none"))
    h = naive.act_and_mul(x.numpy(), act)
    expect = naive.linear(h.reshape(-1, 6), w.numpy(), None if b is None else b.numpy()).reshape(2, 3, 5)
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="activation"):
        ops.act_and_mul_linear(x=x, weight=w, bias=b, prepared=None, activation="gelu_new")



# ----------------------------------------------------------------------------------------------------
# decoder_layer_decode (API 1.4): the whole layer at decode steps
# ----------------------------------------------------------------------------------------------------


def _attention_half(*, hidden_states, residual, positions, input_norm_weight, qkv_weight, o_weight,
                    post_norm_weight, eps, cos_sin_cache, num_heads, num_kv_heads, head_size, rotary_dim, is_neox,
                    scale, kv_cache, slot_mapping, block_table, seq_lens, max_seq_len, **_):
    """The whole-layer ops' first lines (hookspecs.accel_decoder_layer_decode) through the reference's ops:
    the post-attention norm's ``(x, residual)``."""
    R = accel_backend_reference
    t = hidden_states.shape[0]
    if residual is None:
        residual, x = hidden_states, R.accel_rms_norm(x=hidden_states, weight=input_norm_weight, eps=eps)
    else:
        x, residual = R.accel_fused_add_rms_norm(x=hidden_states, residual=residual, weight=input_norm_weight, eps=eps)
    q, k, v = (x @ qkv_weight.T).split([num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size], -1)
    q, k = R.accel_rotary_embedding(positions=positions, query=q.contiguous(), key=k.contiguous(),
                                    cos_sin_cache=cos_sin_cache, head_size=head_size, rotary_dim=rotary_dim,
                                    is_neox=is_neox)
    R.accel_write_kv_cache(key=k.view(t, num_kv_heads, head_size), value=v.reshape(t, num_kv_heads, head_size),
                           kv_cache=kv_cache, slot_mapping=slot_mapping)
    a = R.accel_paged_attention(query=q.view(t, num_heads, head_size), kv_cache=kv_cache, block_table=block_table,
                                seq_lens=seq_lens, query_start_loc=torch.arange(t + 1, dtype=torch.int32),
                                max_query_len=1, max_seq_len=max_seq_len, scale=scale, sliding_window=None,
                                logits_soft_cap=None)
    return R.accel_fused_add_rms_norm(x=a.reshape(t, -1) @ o_weight.T, residual=residual, weight=post_norm_weight,
                                      eps=eps)


def _whole_layer(*, gate_up_weight, down_weight, **kwargs):
    """A native decoder_layer_decode for a throwaway backend: the hookspec's definition through the
    reference's ops, declining (None) steps of more than one sequence, as a kernel with limits would."""
    if kwargs["hidden_states"].shape[0] != 1:
        return None
    x, residual = _attention_half(**kwargs)
    return accel_backend_reference.accel_silu_and_mul(x=x @ gate_up_weight.T) @ down_weight.T, residual


def test_decoder_layer_decode_composite_declines():
    ops = accel_models.resolve_ops("reference")
    assert ops.providers["decoder_layer_decode"] == B.COMPOSITE
    assert ops.decoder_layer_decode(**{p: None for p in B._SPEC_PARAMS["decoder_layer_decode"]}) is None


@pytest.mark.parametrize("name, fused", [("llama", True), ("qwen3", False)])
def test_a_native_decoder_layer_decode_runs_the_plain_dense_layers_at_decode_steps(registry, name, fused):
    """Llama's layers call the backend's whole-layer op at one-token steps (and run op by op where it
    declines: two sequences); Qwen3's q/k-norm layers never call it. Logits equal the reference backend's
    op-by-op model on the same weights through prefill, decodes and a declined two-sequence step."""
    from accel_models.config import load_config
    from accel_models.runner import ModelRunner
    from accel_models.testing.models import TINY_CONFIGS, _build, _load, _randomize

    calls: list = []
    backend("fast", B.PRIMITIVE_OPS, calls, decoder_layer_decode=_whole_layer)
    ops, ref = accel_models.resolve_ops("fast"), accel_models.resolve_ops("reference")
    assert ops.providers["decoder_layer_decode"] == "fast"
    config = load_config(dict(TINY_CONFIGS[name]))
    model = _build(config, ops, torch.float64, "cpu")
    state = _randomize(model, 3)
    _load(model, state)
    expect_model = _build(config, ref, torch.float64, "cpu")
    _load(expect_model, state)
    runners = [ModelRunner(m, block_size=16, num_blocks=8, max_model_len=64) for m in (model, expect_model)]
    steps = [{"a": [5, 9, 2, 7, 1]}, {"a": [3]}, {"a": [8], "b": [4, 4]}, {"b": [6]}, {"a": [1], "b": [2]}, {"a": [0]}]
    whole = 0
    for step in steps:
        before = calls.count(("fast", "decoder_layer_decode"))
        got, want = (r.step(step) for r in runners)
        for seq in step:
            torch.testing.assert_close(got[seq], want[seq], rtol=1e-10, atol=1e-10)
        n = calls.count(("fast", "decoder_layer_decode")) - before
        one_token = sum(len(v) for v in step.values()) == len(step)  # max_query_len == 1
        assert n == (config.num_hidden_layers if fused and one_token else 0), (step, n)
        whole += n
    assert (whole > 0) == fused



# ----------------------------------------------------------------------------------------------------
# moe_decoder_layer_decode (API 1.5): the whole Mixtral layer at decode steps
# ----------------------------------------------------------------------------------------------------


def _whole_moe_layer(*, router_weight, w13, w2, top_k, renormalize, **kwargs):
    """A native moe_decoder_layer_decode for a throwaway backend: the hookspec's definition through the
    reference's ops, declining steps of more than one sequence."""
    R = accel_backend_reference
    if kwargs["hidden_states"].shape[0] != 1:
        return None
    x, residual = _attention_half(**kwargs)
    weights, ids = R.accel_moe_topk(router_logits=x @ router_weight.T, top_k=top_k, scoring_func="softmax",
                                    renormalize=renormalize, num_expert_group=None, topk_group=None,
                                    e_score_correction_bias=None, routed_scaling_factor=1.0)
    return R.accel_fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids,
                                 activation="silu", expert_map=None), residual


def test_moe_decoder_layer_decode_composite_declines():
    ops = accel_models.resolve_ops("reference")
    assert ops.providers["moe_decoder_layer_decode"] == B.COMPOSITE
    assert ops.moe_decoder_layer_decode(**{p: None for p in B._SPEC_PARAMS["moe_decoder_layer_decode"]}) is None


QWEN2_MOE = {  # shared expert + sigmoid gate: not the layer moe_decoder_layer_decode computes
    "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 100, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "qkv_bias": False, "norm_topk_prob": True,
}


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "llama"])
def test_a_native_moe_decoder_layer_decode_runs_the_plain_mixtral_layers_at_decode_steps(registry, name):
    """Mixtral's layers call the backend's whole MoE layer op at one-token steps (op by op where it
    declines: two sequences); Qwen2-MoE's (shared expert) and Llama's (dense: decoder_layer_decode's,
    which this backend lacks) never do. Logits equal the reference backend's op-by-op model."""
    from accel_models.config import load_config
    from accel_models.runner import ModelRunner
    from accel_models.testing.models import TINY_CONFIGS, _build, _load, _randomize

    calls: list = []
    backend("fast", B.PRIMITIVE_OPS, calls, moe_decoder_layer_decode=_whole_moe_layer)
    ops, ref = accel_models.resolve_ops("fast"), accel_models.resolve_ops("reference")
    assert ops.providers["moe_decoder_layer_decode"] == "fast" and "decoder_layer_decode" in ops.composites
    config = load_config(dict(QWEN2_MOE if name == "qwen2_moe" else TINY_CONFIGS[name]))
    model = _build(config, ops, torch.float64, "cpu")
    state = _randomize(model, 4)
    _load(model, state)
    expect_model = _build(config, ref, torch.float64, "cpu")
    _load(expect_model, state)
    runners = [ModelRunner(m, block_size=16, num_blocks=8, max_model_len=64) for m in (model, expect_model)]
    steps = [{"a": [5, 9, 2, 7, 1]}, {"a": [3]}, {"a": [8], "b": [4, 4]}, {"b": [6]}, {"a": [1], "b": [2]}, {"a": [0]}]
    fused = name == "mixtral"
    for step in steps:
        before = calls.count(("fast", "moe_decoder_layer_decode"))
        got, want = (r.step(step) for r in runners)
        for seq in step:
            torch.testing.assert_close(got[seq], want[seq], rtol=1e-10, atol=1e-10)
        n = calls.count(("fast", "moe_decoder_layer_decode")) - before
        one_token = sum(len(v) for v in step.values()) == len(step)
        assert n == (config.num_hidden_layers if fused and one_token else 0), (step, n)
    assert not any(op == "decoder_layer_decode" for _, op in calls)
