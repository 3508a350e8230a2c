"""The conformance kit's checks of the fused ops (API 1.3) pass a correct native implementation, catch
wrong ones, and treat a backend without them as fine (its composite)."""

from __future__ import annotations

import types

import pytest
import torch

import accel_backend_reference
import accel_models
from accel_models import BackendInfo, hookimpl
from accel_models import backends as B
from accel_models.testing import run_conformance

ref = accel_models.resolve_ops("reference")
FUSED = ["rope_and_write_kv_cache", "act_and_mul_linear"]


def _backend(name: str, **fused) -> types.ModuleType:
    """Every primitive op from the reference's code (so a native fused op binds), plus ``fused``."""
    mod = types.ModuleType(name)
    mod.accel_backend_info = hookimpl(lambda: BackendInfo(name=name, device_type="cpu", available=True, reason=None))
    for op in B.PRIMITIVE_OPS:
        setattr(mod, f"accel_{op}", getattr(accel_backend_reference, f"accel_{op}"))
    for op, fn in fused.items():
        setattr(mod, f"accel_{op}", hookimpl(specname=f"accel_{op}")(fn))
    return mod


def rope_ok(positions, query, key, value, cos_sin_cache, head_size, rotary_dim, is_neox, kv_cache, slot_mapping):
    return ref.rope_and_write_kv_cache(positions=positions, query=query, key=key, value=value,
                                       cos_sin_cache=cos_sin_cache, head_size=head_size, rotary_dim=rotary_dim,
                                       is_neox=is_neox, kv_cache=kv_cache, slot_mapping=slot_mapping)


def rope_writes_padding(positions, query, key, value, cos_sin_cache, head_size, rotary_dim, is_neox, kv_cache,
                        slot_mapping):
    """Defect: padding tokens (slot -1) written to slot 0."""
    return rope_ok(positions, query, key, value, cos_sin_cache, head_size, rotary_dim, is_neox, kv_cache,
                   slot_mapping.clamp(min=0))


def rope_caches_unrotated_keys(positions, query, key, value, cos_sin_cache, head_size, rotary_dim, is_neox,
                               kv_cache, slot_mapping):
    """Defect: the cache gets the keys before rotation (the returned ones are right)."""
    ref.write_kv_cache(key=key, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)
    return ref.rotary_embedding(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache,
                                head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox)


def rope_drops_passthrough_dims(positions, query, key, value, cos_sin_cache, head_size, rotary_dim, is_neox,
                                kv_cache, slot_mapping):
    """Defect: with partial rotary, the key's unrotated dims never reach the cache."""
    query, key = ref.rotary_embedding(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache,
                                      head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox)
    cached = key.clone()
    cached[..., rotary_dim:] = 0
    ref.write_kv_cache(key=cached, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)
    return query, key


def act_ok(x, weight, bias, prepared, activation):
    return ref.act_and_mul_linear(x=x, weight=weight, bias=bias, prepared=prepared, activation=activation)


def act_ignores_tanh(x, weight, bias, prepared, activation):
    """Defect: gelu_tanh computed as the erf form."""
    return act_ok(x, weight, bias, prepared, "gelu" if activation == "gelu_tanh" else activation)


def act_drops_bias(x, weight, bias, prepared, activation):
    return act_ok(x, weight, None, prepared, activation)


def act_swaps_gate_and_up(x, weight, bias, prepared, activation):
    g, u = x.chunk(2, dim=-1)
    return act_ok(torch.cat((u, g), -1), weight, bias, prepared, activation)


@pytest.fixture
def register():
    names = []

    def reg(name, **fused):
        accel_models.register_backend(_backend(name, **fused), name)
        names.append(name)
        return name

    yield reg
    for n in names:
        accel_models.unregister_backend(n)


def test_correct_native_fused_ops_pass(register):
    name = register("fused_ok", rope_and_write_kv_cache=rope_ok, act_and_mul_linear=act_ok)
    report = run_conformance(name, ops=FUSED, quick=True, max_examples=10)
    assert report.passed, [(r.op, r.message) for r in report.ops]
    assert all(r.native and r.cases > 0 for r in report.ops)


@pytest.mark.parametrize("op, impl", [
    ("rope_and_write_kv_cache", rope_writes_padding),
    ("rope_and_write_kv_cache", rope_caches_unrotated_keys),
    ("rope_and_write_kv_cache", rope_drops_passthrough_dims),
    ("act_and_mul_linear", act_ignores_tanh),
    ("act_and_mul_linear", act_drops_bias),
    ("act_and_mul_linear", act_swaps_gate_and_up),
], ids=lambda v: getattr(v, "__name__", v))
def test_defects_are_caught(register, op, impl):
    name = register(f"fused_bad_{impl.__name__}", **{op: impl})
    report = run_conformance(name, ops=[op], quick=True, dtypes=(torch.float32,), max_examples=20)
    (rep,) = report.ops
    assert rep.native and rep.status == "fail", (rep.status, rep.message)


def test_a_backend_without_fused_ops_passes_with_its_composites(register):
    name = register("plain")
    report = run_conformance(name, ops=FUSED, quick=True, max_examples=5)
    assert report.passed and all(r.provider == B.COMPOSITE and not r.native for r in report.ops)
    assert all("composite" in r.message for r in report.ops)
    report = run_conformance(name, ops=FUSED, quick=True, native_only=True)
    assert report.passed and all(r.status == "skip" and "composite" in r.message for r in report.ops)
