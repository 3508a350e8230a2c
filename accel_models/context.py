"""The two contexts that connect model code with whoever drives it.

* The **build context** is set by whoever *builds* a model (``load_model``, the runtime, the vLLM adapter,
  a test). Layers read it once, in ``__init__``, to bind their ops, their tensor-parallel group and their
  attention implementation. Model code never reads it and never reads env.
* The **forward context** is set by whoever *runs* a model step (the runtime, the simple runner, the vLLM
  adapter). The zoo's :class:`~accel_models.layers.attention.Attention` reads its per-step state from it:
  the attention metadata of the batch and its own layer's KV cache, found by the layer's prefix.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from accel_models.backends import OpTable


# ----------------------------------------------------------------------------------------------------
# Tensor-parallel group
# ----------------------------------------------------------------------------------------------------


class ParallelGroup:
    """The tensor-parallel group layers shard over. The default is a single process (no communication).

    A subclass wraps a ``torch.distributed`` process group (see ``accel_models.distributed``) or vLLM's
    TP group (the vLLM adapter). Layers call only these methods.
    """

    rank: int = 0
    world_size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group; returns the result (may be in place)."""
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate each rank's ``x`` along ``dim`` in rank order."""
        return x


@dataclass(frozen=True)
class BuildContext:
    """What layers bind at construction.

    Attributes:
        ops: the bound op table (``accel_models.resolve_ops(...)``).
        tp_group: the tensor-parallel group (single process by default).
        ep_enabled: shard MoE by whole experts over ``tp_group`` instead of slicing every expert.
        attention_factory: None for the zoo's paged Attention; otherwise a callable with the zoo
            Attention's constructor keywords that returns the module to use instead (the vLLM adapter
            passes one that builds vLLM's Attention).
        params_dtype: dtype parameters are created in.
        device: device parameters are created on (None: torch's default).
        extra: free-form settings for integrations (never read by model code).
    """

    ops: OpTable
    tp_group: ParallelGroup = field(default_factory=ParallelGroup)
    ep_enabled: bool = False
    attention_factory: Callable[..., Any] | None = None
    params_dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_BUILD_CONTEXT: contextvars.ContextVar[BuildContext | None] = contextvars.ContextVar(
    "accel_models_build_context", default=None
)


@contextlib.contextmanager
def build_context(ctx: BuildContext) -> Iterator[BuildContext]:
    """Set the build context for the layers constructed inside the ``with`` block."""
    token = _BUILD_CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _BUILD_CONTEXT.reset(token)


def get_build_context() -> BuildContext:
    """The current build context; outside any, a default one on the auto-selected backend."""
    ctx = _BUILD_CONTEXT.get()
    if ctx is None:
        from accel_models.backends import resolve_ops

        ctx = BuildContext(ops=resolve_ops())
    return ctx


# ----------------------------------------------------------------------------------------------------
# Forward context
# ----------------------------------------------------------------------------------------------------


@dataclass
class AttentionMetadata:
    """Per-step attention state of one batch (see ``accel_paged_attention`` for the meaning of each field).

    The runtime keeps persistent buffers behind these tensors so a decode step can be captured as a
    device graph and replayed with new contents.
    """

    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, context length including the new tokens
    block_table: torch.Tensor  # [B, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 for padding
    max_query_len: int
    max_seq_len: int
    num_actual_tokens: int  # tokens before any padding
    #: Host copies of ``query_start_loc`` and ``seq_lens`` (the same values, as Python ints) where whoever
    #: builds the metadata has them (the runtime's builder does; None otherwise). Backends whose kernels
    #: take host-side lengths (torch_npu's fused attention takes ``SymInt[]`` lists) read these instead of
    #: copying the tensors back from the device, which would synchronize with the host once a step and
    #: cannot happen inside a device-graph capture. Nothing else reads them.
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None


@dataclass
class ForwardContext:
    """State of one forward step.

    Attributes:
        attn_metadata: the batch's attention metadata.
        kv_caches: layer prefix (e.g. ``"model.layers.0.self_attn.attn"``) -> that layer's KV cache.
    """

    attn_metadata: AttentionMetadata
    kv_caches: dict[str, torch.Tensor]


_FORWARD_CONTEXT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar(
    "accel_models_forward_context", default=None
)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Set the forward context for the model steps run inside the ``with`` block."""
    token = _FORWARD_CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _FORWARD_CONTEXT.reset(token)


def current_forward_context() -> ForwardContext | None:
    """The current forward context, or None outside one (for code that can do without it, e.g. a backend
    looking for :attr:`AttentionMetadata.seq_lens_host`)."""
    return _FORWARD_CONTEXT.get()


def get_forward_context() -> ForwardContext:
    """The current forward context; raises a clear error outside one."""
    ctx = _FORWARD_CONTEXT.get()
    if ctx is None:
        raise RuntimeError(
            "attention ran outside a forward context: a zoo model's forward needs its KV caches and "
            "attention metadata. Run it through accel_models.LLM, accel_models.runner.ModelRunner, or "
            "set one with accel_models.context.forward_context(...)."
        )
    return ctx
