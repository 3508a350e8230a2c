"""Discovery, selection and binding, with throwaway backends registered in-process.

Each throwaway backend is a fresh module object holding hookimpls (as a third-party package would), built
by :func:`make_backend`. The ``registry`` fixture clears the selection env vars, allows only the reference
among installed entry points, and resets the registry before and after each test.
"""

from __future__ import annotations

import re

import logging
import types
from collections.abc import Callable

import pytest
import torch

import accel_backend_reference
import accel_models
from accel_models import BackendError, BackendInfo, hookimpl
from accel_models import backends as B

ENV_VARS = ("ACCEL_BACKEND", "ACCEL_OPS", "ACCEL_STRICT", "ACCEL_PLUGINS", "ACCEL_PLUGINS_BLOCK", "ACCEL_TRACE")


@pytest.fixture
def registry(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    # other backends may be installed in this environment (npu, cuda, ...): load only the reference
    # from entry points, so the throwaway backends are the only competition
    monkeypatch.setenv("ACCEL_PLUGINS", "reference")
    B.reset_registry()
    yield B.get_registry()
    B.reset_registry()


def op_impl(op: str, body: Callable | None = None, *, drop: str | None = None):
    """A hookimpl of ``accel_<op>`` with exactly the spec's keywords (minus ``drop``), delegating to ``body``
    (the reference's function by default)."""
    params = [p for p in B._SPEC_PARAMS[op] if p != drop]
    ref = getattr(accel_backend_reference, f"accel_{op}")
    src = f"def accel_{op}({', '.join(params)}):\n    return _body({', '.join(f'{p}={p}' for p in params)})\n"
    ns: dict = {"_body": body or ref}
    exec(src, ns)
    return hookimpl(ns[f"accel_{op}"])


def make_backend(name: str, ops=("rms_norm",), *, priority: int = 0, available: bool = True,
                 reason: str | None = None, api_version: int = accel_models.HOOKSPEC_API_VERSION,
                 info: Callable | None = None, **impls) -> types.ModuleType:
    """A throwaway backend module implementing ``ops`` (by delegating to the reference) plus ``impls``."""
    mod = types.ModuleType(f"throwaway_backend_{name}")

    def backend_info():
        return BackendInfo(name=name, device_type="cpu", available=available,
                           reason=reason if not available else None, priority=priority, api_version=api_version)

    mod.accel_backend_info = hookimpl(info or backend_info)
    for op in ops:
        setattr(mod, f"accel_{op}", op_impl(op))
    for attr, fn in impls.items():
        setattr(mod, attr, fn)
    return mod


def register(mod: types.ModuleType, name: str) -> B.BackendRecord:
    rec = accel_models.register_backend(mod, name)
    return rec


# ----------------------------------------------------------------------------------------------------
# discovery and auto selection
# ----------------------------------------------------------------------------------------------------


def test_reference_comes_through_its_entry_point(registry):
    rec = registry.records["reference"]
    assert rec.source == "entry point" and rec.usable and rec.plugin is accel_backend_reference
    assert rec.ops == frozenset(B.PRIMITIVE_OPS)  # the fused ops' reference is their composite
    assert accel_models.get_backend().name == "reference"
    assert [b.name for b in accel_models.list_backends()][0] == "reference"


def test_auto_selection_takes_the_highest_priority_usable_backend(registry):
    register(make_backend("low", priority=1), "low")
    register(make_backend("high", priority=10), "high")
    register(make_backend("best_but_unusable", priority=100, available=False, reason="no device"), "best_but_unusable")
    assert accel_models.resolve_ops().backend == "high"
    assert accel_models.get_backend().name == "high"
    accel_models.unregister_backend("high")
    assert accel_models.resolve_ops().backend == "low"


def test_reference_is_last_whatever_the_priorities(registry):
    register(make_backend("negative", priority=-10_000), "negative")
    assert accel_models.resolve_ops().backend == "negative"


def test_list_backends_reports_usable_and_why_not(registry):
    register(make_backend("gone", available=False, reason="needs libfoo 3"), "gone")
    rows = {b.name: b for b in accel_models.list_backends()}
    assert rows["gone"].usable is False and rows["gone"].reason == "needs libfoo 3"
    assert rows["gone"].ops == frozenset({"rms_norm"}) and rows["gone"].source == "inline"
    assert rows["reference"].usable and rows["reference"].reason is None


# ----------------------------------------------------------------------------------------------------
# explicit selection: env, argument, context manager
# ----------------------------------------------------------------------------------------------------


def test_accel_backend_env_selects(registry, monkeypatch):
    register(make_backend("a", priority=1), "a")
    register(make_backend("b", priority=5), "b")
    monkeypatch.setenv("ACCEL_BACKEND", "a")
    assert accel_models.resolve_ops().backend == "a"
    monkeypatch.setenv("ACCEL_BACKEND", "reference")
    assert accel_models.resolve_ops().backend == "reference"
    monkeypatch.setenv("ACCEL_BACKEND", "auto")
    assert accel_models.resolve_ops().backend == "b"


def test_argument_and_context_manager_win_over_env(registry, monkeypatch):
    register(make_backend("a"), "a")
    register(make_backend("b"), "b")
    monkeypatch.setenv("ACCEL_BACKEND", "a")
    assert accel_models.resolve_ops("b").backend == "b"
    with accel_models.use_backend("b"):
        assert accel_models.resolve_ops().backend == "b"
        assert accel_models.get_backend().name == "b"
        with accel_models.use_backend("reference"):
            assert accel_models.resolve_ops().backend == "reference"
        assert accel_models.resolve_ops().backend == "b"
        assert accel_models.resolve_ops("a").backend == "a"  # an explicit argument wins over the block
    assert accel_models.resolve_ops().backend == "a"


def test_context_manager_is_restored_after_an_error(registry):
    register(make_backend("a"), "a")
    with pytest.raises(RuntimeError), accel_models.use_backend("a"):
        raise RuntimeError
    assert accel_models.resolve_ops().backend == "a"  # auto: "a" beats the reference, not the stale block
    with accel_models.use_backend("reference"):
        pass
    assert B._SELECTION.get() is None


def test_unknown_backend_lists_the_installed_ones_with_reasons(registry, monkeypatch):
    register(make_backend("sleepy", available=False, reason="no NPU found (install CANN)"), "sleepy")
    monkeypatch.setenv("ACCEL_BACKEND", "nonexistent")
    with pytest.raises(BackendError) as err:
        accel_models.resolve_ops()
    msg = str(err.value)
    assert "'nonexistent' is not installed" in msg
    assert "reference: usable" in msg and "sleepy: unusable: no NPU found (install CANN)" in msg


def test_unusable_backend_is_refused_unless_allow_unavailable(registry):
    mod = make_backend("sleepy", available=False, reason="no NPU found")
    register(mod, "sleepy")
    with pytest.raises(BackendError, match="'sleepy' is installed but unusable here: no NPU found"):
        accel_models.resolve_ops("sleepy")
    assert accel_models.resolve_ops().backend == "reference"  # auto never picks it
    ops = accel_models.resolve_ops("sleepy", allow_unavailable=True)
    assert ops.backend == "sleepy" and ops.providers["rms_norm"] == "sleepy"
    assert ops.rms_norm is mod.accel_rms_norm
    assert accel_models.get_backend("sleepy", allow_unavailable=True).available is False


def test_backend_info_that_raises_is_unusable_and_breaks_nothing(registry):
    def broken_info():
        raise OSError("driver crashed")

    rec = register(make_backend("crashy", priority=99, info=broken_info), "crashy")
    assert not rec.usable and "accel_backend_info() raised OSError: driver crashed" in rec.reason
    register(make_backend("fine", priority=1), "fine")
    assert accel_models.resolve_ops().backend == "fine"
    rows = {b.name: b for b in accel_models.list_backends()}
    assert "driver crashed" in rows["crashy"].reason
    with pytest.raises(BackendError, match="driver crashed"):
        accel_models.resolve_ops("crashy", allow_unavailable=True)


def test_backend_without_info_or_with_a_wrong_name_is_unusable(registry):
    mod = make_backend("noinfo")
    del mod.accel_backend_info
    assert "does not implement accel_backend_info" in register(mod, "noinfo").reason
    assert "reports name 'other'" in register(make_backend("other"), "misnamed").reason


def test_wrong_api_version_is_refused(registry):
    rec = register(make_backend("future", api_version=accel_models.HOOKSPEC_API_VERSION + 1), "future")
    assert not rec.usable
    assert f"written for hookspec API {accel_models.HOOKSPEC_API_VERSION + 1}" in rec.reason
    for allow in (False, True):
        with pytest.raises(BackendError, match="hookspec API"):
            accel_models.resolve_ops("future", allow_unavailable=allow)


def test_hookimpl_missing_a_spec_keyword_is_refused_at_bind_time(registry):
    mod = make_backend("sloppy", ops=(), accel_rms_norm=op_impl("rms_norm", lambda x, weight: x, drop="eps"))
    assert register(mod, "sloppy").usable  # pluggy accepts a subset of the spec's arguments...
    with pytest.raises(BackendError, match=r"accel_rms_norm without the keyword\(s\) \['eps'\]"):
        accel_models.resolve_ops("sloppy")  # ...binding does not: bound ops get every keyword


def test_hookimpl_with_an_unknown_argument_is_rejected_by_the_plugin_manager(registry):
    @hookimpl
    def accel_rms_norm(x, weight, eps, bogus):
        return x

    rec = register(make_backend("odd", ops=(), accel_rms_norm=accel_rms_norm), "odd")
    assert not rec.usable and "rejected by the plugin manager" in rec.reason and "bogus" in rec.reason


# ----------------------------------------------------------------------------------------------------
# binding: fallback, providers, strict mode
# ----------------------------------------------------------------------------------------------------


def test_per_op_fallback_to_the_reference(registry):
    mod = make_backend("partial", ops=("rms_norm", "silu_and_mul"))
    register(mod, "partial")
    ops = accel_models.resolve_ops("partial")
    assert ops.providers == {op: ("partial" if op in ("rms_norm", "silu_and_mul") else
                                  B.COMPOSITE if op in B.COMPOSITE_OPS else "reference") for op in B.OP_NAMES}
    assert sorted(ops.fallbacks) == sorted(set(B.PRIMITIVE_OPS) - {"rms_norm", "silu_and_mul"} - set(B.OPTIONAL_OPS)
                                          - set(B.PORTABLE_OPS))
    assert sorted(ops.composites) == sorted(B.COMPOSITE_OPS)
    assert ops.rms_norm is mod.accel_rms_norm
    assert ops.gelu_and_mul is accel_backend_reference.accel_gelu_and_mul
    assert ops.strict is False and ops.device_type == "cpu" and ops.info.name == "partial"
    x = torch.randn(2, 8)
    torch.testing.assert_close(ops.rms_norm(x=x, weight=torch.ones(8), eps=1e-6),
                               accel_backend_reference.accel_rms_norm(x=x, weight=torch.ones(8), eps=1e-6))


def test_kv_cache_group_falls_back_together(registry):
    """A backend with its own paged_attention but not the rest of the group: all four come from the reference."""
    register(make_backend("half_kv", ops=("paged_attention", "write_kv_cache", "rms_norm")), "half_kv")
    ops = accel_models.resolve_ops("half_kv")
    assert {ops.providers[op] for op in B.KV_CACHE_GROUP} == {"reference"}
    assert ops.providers["rms_norm"] == "half_kv"
    full = make_backend("full_kv", ops=B.KV_CACHE_GROUP)
    register(full, "full_kv")
    ops = accel_models.resolve_ops("full_kv")
    assert {ops.providers[op] for op in B.KV_CACHE_GROUP} == {"full_kv"}
    assert ops.paged_attention is full.accel_paged_attention


def test_linear_group_falls_back_and_moves_together(registry, monkeypatch):
    """prepare_linear and linear come from one backend: a prepared weight is readable only by its preparer."""
    register(make_backend("half_lin", ops=("linear", "rms_norm")), "half_lin")
    ops = accel_models.resolve_ops("half_lin")
    assert {ops.providers[op] for op in B.LINEAR_GROUP} == {"reference"}
    full = make_backend("full_lin", ops=B.LINEAR_GROUP)
    register(full, "full_lin")
    ops = accel_models.resolve_ops("full_lin")
    assert {ops.providers[op] for op in B.LINEAR_GROUP} == {"full_lin"}
    assert ops.linear is full.accel_linear
    monkeypatch.setenv("ACCEL_OPS", "prepare_linear=reference")
    ops = accel_models.resolve_ops("full_lin")
    assert {ops.providers[op] for op in B.LINEAR_GROUP} == {"reference"}
    monkeypatch.setenv("ACCEL_OPS", "linear=full_lin,prepare_linear=reference")
    with pytest.raises(BackendError, match=r"linear ops \('prepare_linear', 'linear'\) on different backends.*prepared"):
        accel_models.resolve_ops("reference")


def test_bound_op_is_the_hookimpl_function_and_bypasses_pluggy(registry):
    ops = accel_models.resolve_ops("reference")
    for op in B.PRIMITIVE_OPS:
        assert getattr(ops, op) is getattr(accel_backend_reference, f"accel_{op}")

    def no_pluggy(*args, **kwargs):
        raise AssertionError("a bound op call went through pluggy")

    registry.pm._inner_hookexec = no_pluggy
    out = ops.rms_norm(x=torch.ones(2, 4), weight=torch.ones(4), eps=0.0)
    torch.testing.assert_close(out, torch.ones(2, 4))
    with pytest.raises(AssertionError, match="through pluggy"):  # the trap does catch hook calls
        registry.pm.hook.accel_rms_norm(x=torch.ones(2, 4), weight=torch.ones(4), eps=0.0)


def test_optable_rejects_names_that_are_not_ops(registry):
    ops = accel_models.resolve_ops()
    with pytest.raises(AttributeError, match="rms_nrom"):
        ops.rms_nrom  # noqa: B018
    assert "reference" in repr(ops)


@pytest.mark.parametrize("how", ["env", "argument", "context"])
def test_strict_mode_names_the_missing_ops(registry, monkeypatch, how):
    register(make_backend("partial", ops=("rms_norm", "silu_and_mul")), "partial")
    missing = [op for op in B.PRIMITIVE_OPS if op not in ("rms_norm", "silu_and_mul") and op not in B.OPTIONAL_OPS
               and op not in B.PORTABLE_OPS]
    if how == "env":
        monkeypatch.setenv("ACCEL_STRICT", "1")
        call = lambda: accel_models.resolve_ops("partial")  # noqa: E731
    elif how == "argument":
        call = lambda: accel_models.resolve_ops("partial", strict=True)  # noqa: E731
    else:
        def call():
            with accel_models.use_backend("partial", strict=True):
                return accel_models.resolve_ops()
    with pytest.raises(BackendError) as err:
        call()
    assert "strict mode" in str(err.value) and "'partial'" in str(err.value)
    for op in missing:
        assert op in str(err.value)
    # dense matmul runs in every device's torch, fused ops have composites: strict mode asks for neither
    for op in (*B.PORTABLE_OPS, *B.COMPOSITE_OPS):
        assert not re.search(rf"\b{op}\b", str(err.value).split("implement", 1)[1].split(";")[0]), op


def test_strict_argument_false_wins_over_env_and_full_backend_passes_strict(registry, monkeypatch):
    register(make_backend("partial"), "partial")
    register(make_backend("complete", ops=B.PRIMITIVE_OPS), "complete")
    monkeypatch.setenv("ACCEL_STRICT", "1")
    assert accel_models.resolve_ops("partial", strict=False).strict is False
    ops = accel_models.resolve_ops("complete")
    assert ops.strict is True and not ops.fallbacks and sorted(ops.composites) == sorted(B.COMPOSITE_OPS)
    # strict is satisfied by explicit per-op overrides
    ops = accel_models.resolve_ops("partial", ops={op: "reference" for op in B.PRIMITIVE_OPS if op != "rms_norm"})
    assert ops.providers["rms_norm"] == "partial"


# ----------------------------------------------------------------------------------------------------
# per-op overrides (ACCEL_OPS, ops=, use_backend(ops=))
# ----------------------------------------------------------------------------------------------------


def test_accel_ops_overrides_one_op(registry, monkeypatch):
    register(make_backend("full", ops=B.PRIMITIVE_OPS), "full")
    register(make_backend("other", ops=("silu_and_mul",)), "other")
    monkeypatch.setenv("ACCEL_OPS", " rms_norm = reference , silu_and_mul=other")
    ops = accel_models.resolve_ops("full")
    assert ops.providers["rms_norm"] == "reference" and ops.providers["silu_and_mul"] == "other"
    assert ops.rms_norm is accel_backend_reference.accel_rms_norm
    assert all(p == "full" for op, p in ops.providers.items()
               if op not in ("rms_norm", "silu_and_mul") and op not in B.COMPOSITE_OPS)


@pytest.mark.parametrize(("spec", "match"), [
    ("rms_nrom=reference", r"unknown op 'rms_nrom'"),
    ("rms_norm=nowhere", r"rms_norm=nowhere: backend 'nowhere' is not installed(.|\n)*reference: usable"),
    ("rms_norm", r"'rms_norm' is not of the form op=backend"),
    ("moe_topk=other", r"backend 'other' does not implement moe_topk"),
    ("rms_norm=sleepy", r"'sleepy' is installed but unusable here: asleep"),
    ("paged_attention=reference,write_kv_cache=other", r"KV-cache ops .* different backends"),
])
def test_bad_accel_ops_is_an_error_naming_it(registry, monkeypatch, spec, match):
    register(make_backend("other", ops=("silu_and_mul",)), "other")
    register(make_backend("sleepy", available=False, reason="asleep"), "sleepy")
    monkeypatch.setenv("ACCEL_OPS", spec)
    with pytest.raises(BackendError, match=match):
        accel_models.resolve_ops("reference")


def test_override_of_one_kv_op_moves_the_whole_group(registry, monkeypatch):
    register(make_backend("full", ops=B.PRIMITIVE_OPS), "full")
    for op in B.KV_CACHE_GROUP:
        monkeypatch.setenv("ACCEL_OPS", f"{op}=reference")
        ops = accel_models.resolve_ops("full")
        assert {ops.providers[g] for g in B.KV_CACHE_GROUP} == {"reference"}, op
        assert ops.providers["rms_norm"] == "full"
        assert ops.paged_attention is accel_backend_reference.accel_paged_attention
    # and the other way: the reference selected, the group moved to "full" by naming one of its ops
    monkeypatch.setenv("ACCEL_OPS", "write_kv_cache=full")
    ops = accel_models.resolve_ops("reference")
    assert {ops.providers[g] for g in B.KV_CACHE_GROUP} == {"full"}


def test_kv_group_override_to_a_backend_lacking_part_of_the_group_is_an_error(registry, monkeypatch):
    register(make_backend("half_kv", ops=("paged_attention",)), "half_kv")
    monkeypatch.setenv("ACCEL_OPS", "paged_attention=half_kv")
    with pytest.raises(BackendError, match="backend 'half_kv' does not implement"):
        accel_models.resolve_ops("reference")


def test_programmatic_overrides_merge_over_env(registry, monkeypatch):
    register(make_backend("full", ops=B.PRIMITIVE_OPS), "full")
    monkeypatch.setenv("ACCEL_OPS", "rms_norm=reference,silu_and_mul=reference")
    with accel_models.use_backend("full", ops="silu_and_mul=full,gelu_and_mul=reference"):
        ops = accel_models.resolve_ops(ops={"gelu_and_mul": "full", "moe_topk": "reference"})
    assert ops.providers["rms_norm"] == "reference"  # env
    assert ops.providers["silu_and_mul"] == "full"  # use_backend over env
    assert ops.providers["gelu_and_mul"] == "full"  # argument over use_backend
    assert ops.providers["moe_topk"] == "reference"
    with pytest.raises(BackendError, match="use_backend.*unknown op 'nope'"), accel_models.use_backend(ops="nope=full"):
        pass
    with pytest.raises(BackendError, match="unknown op 'nope'"):
        accel_models.resolve_ops(ops={"nope": "full"})


def test_programmatic_kv_group_override_wins_over_env_group_override(registry, monkeypatch):
    """ACCEL_OPS moves the group to one backend, the ops= argument moves it (by another member) elsewhere."""
    register(make_backend("full", ops=B.PRIMITIVE_OPS), "full")
    monkeypatch.setenv("ACCEL_OPS", "paged_attention=full")
    ops = accel_models.resolve_ops("reference", ops={"write_kv_cache": "reference"})
    assert {ops.providers[g] for g in B.KV_CACHE_GROUP} == {"reference"}


# ----------------------------------------------------------------------------------------------------
# tracing
# ----------------------------------------------------------------------------------------------------


def test_accel_trace_logs_every_bound_call(registry, monkeypatch, caplog):
    monkeypatch.setenv("ACCEL_TRACE", "1")
    ops = accel_models.resolve_ops("reference")
    assert ops.rms_norm is not accel_backend_reference.accel_rms_norm
    assert ops.rms_norm.__wrapped__ is accel_backend_reference.accel_rms_norm
    x = torch.randn(3, 8)
    with caplog.at_level(logging.INFO, logger="accel_models.backends"):
        out = ops.rms_norm(x=x, weight=torch.ones(8), eps=1e-6)
    torch.testing.assert_close(out, accel_backend_reference.accel_rms_norm(x=x, weight=torch.ones(8), eps=1e-6))
    assert any("rms_norm" in r.getMessage() and "reference" in r.getMessage() and "(3, 8)" in r.getMessage()
               for r in caplog.records)
    monkeypatch.delenv("ACCEL_TRACE")
    assert accel_models.resolve_ops("reference").rms_norm is accel_backend_reference.accel_rms_norm


# ----------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------


def test_reregistering_a_name_replaces_the_plugin(registry):
    first, second = make_backend("x", priority=1), make_backend("x", priority=2)
    register(first, "x")
    register(second, "x")
    assert accel_models.resolve_ops("x").rms_norm is second.accel_rms_norm
    accel_models.unregister_backend("x")
    with pytest.raises(BackendError, match="'x' is not installed"):
        accel_models.resolve_ops("x")
    accel_models.unregister_backend("x")  # unregistering twice is harmless


def test_reset_registry_reloads_entry_points(registry):
    register(make_backend("temp"), "temp")
    B.reset_registry()
    assert "temp" not in B.get_registry().records and "reference" in B.get_registry().records


def test_strict_mode_does_not_require_the_optional_capture_graph_hook(registry):
    """capture_graph (API 1.1) is a backend-level hook, not a numeric op: a backend written for API 1.0
    with every op passes strict mode and gets the reference's answer (no graphs)."""
    numeric = [op for op in B.PRIMITIVE_OPS if op not in B.OPTIONAL_OPS]
    register(make_backend("api10", ops=numeric), "api10")
    ops = accel_models.resolve_ops("api10", strict=True)
    assert ops.providers["capture_graph"] == "reference" and ops.fallbacks == []
    assert ops.capture_graph(fn=lambda: None, device=torch.device("cpu"), pool=None) is None
