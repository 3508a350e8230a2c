"""Availability, selection and bad input: no torch_npu here, so the backend must say so clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import accel_backend_npu
import accel_models
from accel_backend_npu import TorchNpuUnavailableError, get_torch_npu, use_torch_npu
from accel_backend_npu.emulation import TorchNpuEmulation
from accel_models.backends import BackendError

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch_npu") is not None,
    reason="torch_npu is installed here: these tests describe a machine without it",
)


@pytest.fixture(autouse=True)
def fresh_registry():
    """The registry records each backend's info when it loads: reload it here, with nothing injected."""
    accel_models.backends.reset_registry()
    yield
    accel_models.backends.reset_registry()


def test_info_without_torch_npu():
    info = accel_backend_npu.accel_backend_info()
    assert (info.name, info.device_type, info.dist_backend, info.available) == ("npu", "npu", "hccl", False)
    assert "torch_npu is not installed" in info.reason
    assert "pip install" in info.reason and "CANN" in info.reason


def test_get_torch_npu_names_what_is_missing():
    with pytest.raises(TorchNpuUnavailableError, match="torch_npu is not installed.*set_env.sh"):
        get_torch_npu()


def test_selecting_npu_without_torch_npu_is_a_clear_error(monkeypatch):
    with pytest.raises(BackendError, match=r"'npu' is installed but unusable here: torch_npu is not installed"):
        accel_models.resolve_ops(backend="npu")
    monkeypatch.setenv("ACCEL_BACKEND", "npu")
    with pytest.raises(BackendError, match="torch_npu is not installed.*pip install"):
        accel_models.resolve_ops()


def test_an_injected_emulation_binds_every_op_but_is_not_available():
    with use_torch_npu(TorchNpuEmulation()) as emu:
        assert get_torch_npu() is emu
        info = accel_backend_npu.accel_backend_info()
        assert not info.available and "EMULATION" in info.reason
        ops = accel_models.resolve_ops(backend="npu", allow_unavailable=True, strict=True)
        assert ops.fallbacks == [] and ops.device_type == "npu"
        out = ops.silu_and_mul(x=torch.ones(2, 8))  # CPU tensors run through the emulation
        assert out.shape == (2, 4) and emu.called() == ["npu_swiglu"]
    with pytest.raises(TorchNpuUnavailableError):
        get_torch_npu()  # the injection ends with the block


def _run(code: str, extra_path: str | None = None) -> str:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_torch_npu_that_fails_to_import_is_reported_with_cann_advice(tmp_path):
    # A stand-in package named torch_npu that fails like torch_npu does without CANN (never the real one).
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('libhccl.so: cannot open shared object file')\n")
    out = _run("""
        import accel_backend_npu
        print(accel_backend_npu.accel_backend_info().reason)
    """, extra_path=str(tmp_path))
    assert "installed but does not import" in out and "libhccl.so" in out and "set_env.sh" in out


def test_torch_npu_without_a_device_is_reported_and_import_stays_lazy(tmp_path):
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")  # imports, registers no torch.npu: as with no NPU visible
    out = _run("""
        import sys, accel_backend_npu
        print('torch_npu' in sys.modules)  # importing the backend never imports torch_npu
        print(accel_backend_npu.accel_backend_info().reason)
    """, extra_path=str(tmp_path))
    lazy, reason = out.split("\n", 1)
    assert lazy == "False"
    assert "no Ascend NPU is visible" in reason and "npu-smi" in reason
