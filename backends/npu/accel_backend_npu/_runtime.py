"""The one way into torch_npu: :func:`get_torch_npu`, plus injection for tests and the availability probe.

Every op of this backend reaches torch_npu through :func:`get_torch_npu`, never through a module-level
``import torch_npu``: importing ``accel_backend_npu`` must work on a machine without CANN, and tests point
the backend at an emulation (``accel_backend_npu.emulation``) with :func:`use_torch_npu` instead of
patching ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import threading
from collections.abc import Iterator
from typing import Any

#: How to get a working torch_npu, quoted in every "unavailable" message.
INSTALL_HINT = (
    "On an Ascend machine: install the Ascend driver, the CANN toolkit and kernels, run "
    "`source /usr/local/Ascend/ascend-toolkit/set_env.sh`, then `pip install 'accel-backend-npu[torch-npu]'` "
    "(or `pip install torch-npu==<your torch version>`). Never install torch-npu on a machine without CANN: "
    "its torch.backends autoload entry point then makes every `import torch` fail."
)


class TorchNpuUnavailableError(RuntimeError):
    """torch_npu cannot be used here; the message says what is missing and how to install it."""


_lock = threading.Lock()
_injected: Any | None = None  # a module-like object standing in for torch_npu (tests: the emulation)
_real: Any | None = None  # the real torch_npu once imported


def get_torch_npu() -> Any:
    """torch_npu, or the object injected with :func:`use_torch_npu` / :func:`set_torch_npu`.

    Raises:
        TorchNpuUnavailableError: nothing injected and torch_npu does not import.
    """
    if _injected is not None:
        return _injected
    if _real is not None:
        return _real
    return _import_real()


def _import_real() -> Any:
    global _real
    with _lock:
        if _real is None:
            if importlib.util.find_spec("torch_npu") is None:
                raise TorchNpuUnavailableError(f"torch_npu is not installed. {INSTALL_HINT}")
            try:
                _real = importlib.import_module("torch_npu")
            except Exception as exc:  # CANN missing or mismatched: a library fails to load
                raise TorchNpuUnavailableError(
                    f"torch_npu is installed but does not import ({type(exc).__name__}: {exc}); CANN is missing, "
                    f"not on the library path, or of another version. {INSTALL_HINT}"
                ) from exc
        return _real


def set_torch_npu(module: Any | None) -> Any | None:
    """Make :func:`get_torch_npu` return ``module`` (None: the real torch_npu again). Returns the previous one."""
    global _injected
    with _lock:
        previous, _injected = _injected, module
    return previous


@contextlib.contextmanager
def use_torch_npu(module: Any) -> Iterator[Any]:
    """Within the block, the backend calls ``module`` instead of torch_npu (tests inject the emulation).

    >>> from accel_backend_npu.emulation import TorchNpuEmulation
    >>> with use_torch_npu(TorchNpuEmulation()) as emu:
    ...     ops = accel_models.resolve_ops(backend="npu", allow_unavailable=True)
    ...     ops.rms_norm(x=x, weight=w, eps=1e-6)
    """
    previous = set_torch_npu(module)
    try:
        yield module
    finally:
        set_torch_npu(previous)


def is_emulated() -> bool:
    """True while an injected stand-in (not the real torch_npu) is in use."""
    return _injected is not None


def probe() -> tuple[bool, str | None]:
    """Whether this backend can run here: torch_npu imports and an Ascend NPU is visible. Never raises."""
    if _injected is not None:
        name = getattr(_injected, "__name__", type(_injected).__name__)
        return False, (f"torch_npu is replaced by an injected stand-in ({name}), not a real Ascend NPU; "
                       "bind with resolve_ops(backend='npu', allow_unavailable=True) to run its ops")
    try:
        _import_real()
    except TorchNpuUnavailableError as exc:
        return False, str(exc)
    try:
        import torch

        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available() or npu.device_count() < 1:
            return False, ("torch_npu imports but no Ascend NPU is visible (torch.npu.is_available() is False): "
                           "check the driver with `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES")
    except Exception as exc:
        return False, f"torch_npu imports but probing the NPU failed ({type(exc).__name__}: {exc})"
    return True, None
