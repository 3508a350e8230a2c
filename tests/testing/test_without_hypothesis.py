"""The runtime install has no hypothesis: the CLI, the demo's command table and the pytest plugin must still
load, and `accel-models check` must say what to install (a fresh `bash dev/demo.sh` once crashed here)."""

import subprocess
import sys

SCRIPT = r"""
import sys
sys.modules["hypothesis"] = None  # as if not installed
from accel_models.cli import build_parser, main
import accel_models.testing.plugin  # the pytest11 entry point
import accel_models.testing as kit
parser = build_parser()
assert {"backends", "ops", "demo", "generate", "check"} <= set(parser._subparsers._group_actions[0].choices)
try:
    kit.run_conformance
except ModuleNotFoundError as exc:
    assert "accel-models[testing]" in str(exc), exc
else:
    raise AssertionError("run_conformance imported without hypothesis")
sys.exit(main(["check", "--backend", "reference", "--quick"]))
"""


def test_cli_and_plugin_load_without_hypothesis():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs hypothesis" in proc.stderr and "accel-models[testing]" in proc.stderr, proc.stderr
