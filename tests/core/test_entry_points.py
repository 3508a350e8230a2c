"""Real packages with an ``accel_models.backends`` entry point, installed with pip into a temporary
directory and discovered by a fresh Python process (so no registry state leaks either way).

``good-accel-backend`` implements accel_rms_norm with priority 50; ``broken-accel-backend`` raises on
import. The broken one must show up as unusable with its error and must not break the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GOOD = '''
import torch
from accel_models import BackendInfo, hookimpl

@hookimpl
def accel_backend_info():
    return BackendInfo(name="good", device_type="cpu", available=True, reason=None, priority=50)

@hookimpl
def accel_rms_norm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
'''

BROKEN = '''
raise ImportError("needs libfoo.so.3, which is not installed")
'''

SCENARIOS = '''
import json, os
import torch
import accel_models
from accel_models import BackendError
from accel_models import backends as B

def snapshot():
    return {b.name: {"usable": b.usable, "reason": b.reason, "version": b.version, "source": b.source,
                     "ops": sorted(b.ops)} for b in accel_models.list_backends()}

out = {}
# only our two packages and the reference (other backends may be installed in this environment)
os.environ["ACCEL_PLUGINS"] = "good,broken"
B.reset_registry()
out["backends"] = snapshot()
ops = accel_models.resolve_ops()
out["auto"] = ops.backend
out["providers"] = dict(ops.providers)
import good_accel_backend
out["bound_is_impl"] = ops.rms_norm is good_accel_backend.accel_rms_norm
x = torch.randn(3, 8)
out["rms_norm_ok"] = bool(torch.allclose(ops.rms_norm(x=x, weight=torch.ones(8), eps=1e-6),
                                         accel_models.resolve_ops("reference").rms_norm(x=x, weight=torch.ones(8), eps=1e-6)))
try:
    accel_models.resolve_ops("broken")
except BackendError as e:
    out["broken_error"] = str(e)
os.environ["ACCEL_BACKEND"] = "nothing"
try:
    accel_models.resolve_ops()
except BackendError as e:
    out["nothing_error"] = str(e)
del os.environ["ACCEL_BACKEND"]

os.environ["ACCEL_PLUGINS"] = "broken"  # allowlist: good is not even imported; the reference always is
B.reset_registry()
out["allow_broken"] = sorted(snapshot())
out["allow_broken_auto"] = accel_models.resolve_ops().backend

os.environ["ACCEL_PLUGINS"] = "good,broken"
os.environ["ACCEL_PLUGINS_BLOCK"] = "good, reference"  # the reference cannot be blocked
B.reset_registry()
out["block_good"] = sorted(snapshot())
print("RESULT " + json.dumps(out))
'''


def write_project(root: Path, dist: str, module: str, ep_name: str, source: str) -> Path:
    proj = root / dist
    (proj / module).mkdir(parents=True)
    (proj / module / "__init__.py").write_text(textwrap.dedent(source))
    (proj / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.3.0"

        [project.entry-points."accel_models.backends"]
        {ep_name} = "{module}"

        [tool.setuptools]
        packages = ["{module}"]
    '''))
    return proj


@pytest.fixture(scope="module")
def scenario_results(tmp_path_factory):
    pytest.importorskip("setuptools", reason="building the throwaway packages needs setuptools")
    root = tmp_path_factory.mktemp("throwaway_backends")
    good = write_project(root, "good-accel-backend", "good_accel_backend", "good", GOOD)
    broken = write_project(root, "broken-accel-backend", "broken_accel_backend", "broken", BROKEN)
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "--target", str(site), str(good), str(broken)],
                   check=True, capture_output=True, text=True)
    assert (site / "good_accel_backend-0.3.0.dist-info" / "entry_points.txt").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCEL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", SCENARIOS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_installed_backend_is_discovered_and_auto_selected(scenario_results):
    r = scenario_results
    good = r["backends"]["good"]
    assert good == {"usable": True, "reason": None, "version": "0.3.0", "source": "entry point", "ops": ["rms_norm"]}
    assert r["auto"] == "good"
    assert r["providers"]["rms_norm"] == "good"
    # every other op falls back to the reference; the fused ops (API 1.3) are composites of the table's ops
    fused = ("rope_and_write_kv_cache", "act_and_mul_linear", "decoder_layer_decode", "moe_decoder_layer_decode")
    assert all(p == ("composite" if op in fused else "reference")
               for op, p in r["providers"].items() if op != "rms_norm")
    assert r["bound_is_impl"] and r["rms_norm_ok"]


def test_plugin_raising_on_import_is_unusable_with_its_error(scenario_results):
    r = scenario_results
    broken = r["backends"]["broken"]
    assert broken["usable"] is False
    assert "failed to import 'broken_accel_backend'" in broken["reason"]
    assert "ImportError: needs libfoo.so.3, which is not installed" in broken["reason"]
    assert r["backends"]["reference"]["usable"]
    assert "'broken' is installed but unusable here" in r["broken_error"] and "libfoo" in r["broken_error"]


def test_unknown_backend_error_lists_installed_backends_and_reasons(scenario_results):
    msg = scenario_results["nothing_error"]
    assert "'nothing' is not installed" in msg
    assert "good: usable" in msg and "reference: usable" in msg and "broken: unusable: failed to import" in msg


def test_allow_and_block_lists(scenario_results):
    r = scenario_results
    assert r["allow_broken"] == ["broken", "reference"]
    assert r["allow_broken_auto"] == "reference"
    assert r["block_good"] == ["broken", "reference"]
