"""pytest plugin of the conformance kit (entry point ``pytest11``): options and a report header."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("accel-models", "accel-models backend conformance")
    group.addoption("--accel-quick", action="store_true", default=False, dest="accel_quick",
                    help="fewer and smaller conformance cases")
    group.addoption("--accel-max-examples", type=int, default=None, dest="accel_max_examples",
                    help="hypothesis examples per (op, dtype)")
