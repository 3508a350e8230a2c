"""Conformance kit for backend authors: hypothesis strategies, per-op checks against a float64 reference,
a pytest base class and the ``accel-models check`` command.

    from accel_models.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "mybackend"

Needs hypothesis and pytest (``pip install accel-models[testing]``). The names below load on first use,
so the ``accel-models`` command and the pytest plugin work where hypothesis is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ConformanceReport": "accel_models.testing.conformance",
    "OpReport": "accel_models.testing.conformance",
    "check_op": "accel_models.testing.conformance",
    "run_conformance": "accel_models.testing.conformance",
    "BackendConformance": "accel_models.testing.suite",
    "DTYPE_TOLERANCES": "accel_models.testing.tolerances",
    "OP_FACTORS": "accel_models.testing.tolerances",
    "tolerance": "accel_models.testing.tolerances",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'accel_models.testing' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name in ("hypothesis", "pytest"):
            raise ModuleNotFoundError(
                f"accel_models.testing.{name} needs {exc.name}: pip install 'accel-models[testing]'", name=exc.name
            ) from exc
        raise


__all__ = sorted(_LAZY)
