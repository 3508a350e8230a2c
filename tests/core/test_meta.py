"""Meta-tests that keep the op contract honest (as datasette's test_plugins does for its hooks):
every hookspec is documented with shapes, has a reference implementation, and is named in a test.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import accel_backend_reference
from accel_models import backends as B
from accel_models import hookspecs

HOOKS = sorted(name for name, fn in vars(hookspecs).items() if name.startswith("accel_") and inspect.isfunction(fn))
TESTS = Path(__file__).resolve().parents[1]


def test_hook_names_and_op_names_agree():
    assert "accel_backend_info" in HOOKS
    assert sorted(f"accel_{op}" for op in B.OP_NAMES) == sorted(set(HOOKS) - {"accel_backend_info"})
    for hook in HOOKS:  # every hook is a pluggy hookspec; every op is firstresult (one implementation computes it)
        opts = getattr(getattr(hookspecs, hook), "accel_models_spec")
        assert opts["firstresult"] is True, hook


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_is_documented(hook):
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    assert len(doc) > 80, f"{hook} needs a docstring that states shapes, dtypes, in-place behaviour and math"
    assert re.search(r"Added in API \d+", doc), f"{hook}'s docstring must say the API version that added it"
    params = inspect.signature(fn).parameters.values()
    takes_tensor = any("Tensor" in str(p.annotation) for p in params)
    if takes_tensor:  # shapes in the ``[num_tokens, hidden]`` notation
        assert re.search(r"``\[[^\]]+\]", doc), f"{hook}'s docstring states no tensor shape"
    assert fn.__annotations__.get("return") is not None, f"{hook} has no return annotation"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_has_a_reference_implementation(hook):
    if hook[len("accel_"):] in B.COMPOSITE_OPS:  # fused ops (API 1.3): a composite in accel_models, no backend code
        from accel_models import composites

        impl = composites.FACTORIES[hook[len("accel_"):]]({op: None for op in B.PRIMITIVE_OPS})
        assert list(inspect.signature(impl).parameters) == list(inspect.signature(getattr(hookspecs, hook)).parameters)
        assert getattr(accel_backend_reference, hook, None) is None  # the reference's answer is the composite
        return
    impl = getattr(accel_backend_reference, hook, None)
    assert impl is not None, f"the reference backend lacks {hook}"
    assert hasattr(impl, "accel_models_impl"), f"reference {hook} is not marked with @accel_models.hookimpl"
    if hook != "accel_backend_info":  # bound ops are called with every keyword of the spec
        assert list(inspect.signature(impl).parameters) == list(inspect.signature(getattr(hookspecs, hook)).parameters)


def _test_sources() -> str:
    me = Path(__file__).resolve()
    return "\n".join(p.read_text() for p in sorted(TESTS.rglob("test_*.py")) if p.resolve() != me)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_is_exercised_by_a_test(hook):
    op = hook[len("accel_"):]
    pattern = rf"(?<![A-Za-z0-9_])(accel_)?{op}(?![A-Za-z0-9_])"
    assert re.search(pattern, _test_sources()), f"no test under tests/ mentions {op}"
