"""The hook specifications: the one file a backend author reads.

Every op the zoo needs from hardware is one hook named ``accel_<op>``. A backend is a module (or object)
whose functions carry the :data:`hookimpl` marker and the hook's name; it registers itself through the
``accel_models.backends`` entry-point group (the entry-point name is the backend name).

Calling convention
------------------
* Ops are **bound, not dispatched**: when a model is built, the core resolves each op to one function
  (the selected backend's, else the reference backend's) and layers call that function directly with
  **every keyword of the spec**. An implementation must therefore accept all the spec's parameter names
  (the core checks this when it binds, and refuses a backend that does not). Positional calls never happen.
* ``firstresult=True`` on every op: exactly one implementation computes it.
* Index tensors have fixed dtypes so backends agree: ``positions`` int64, ``slot_mapping`` int64,
  ``block_table`` / ``seq_lens`` / ``query_start_loc`` int32, ``topk_ids`` int32.
* Floating inputs are float32, float16 or bfloat16 (and float64 on the reference backend). Unless a spec
  says otherwise, outputs have the input's dtype and device; math accumulates in at least float32.
  An op given a dtype or shape it does not support raises ``ValueError`` naming the argument and what is
  supported.
* "May be in place" means the op is allowed to write its result into the named input; callers always use
  the returned tensors and treat such inputs as consumed.
* The KV-cache ops (``kv_cache_layout``, ``allocate_kv_cache``, ``write_kv_cache``, ``paged_attention``)
  form one group: a cache written in one backend's layout is readable only by that backend's ops, so the
  core binds the four from the same backend, in fallback and in per-op overrides alike. ``prepare_linear``
  and ``linear`` form another (a prepared weight is readable only by the backend that prepared it).

Fused ops (API 1.3)
-------------------
A *fused op* (``rope_and_write_kv_cache``, ``act_and_mul_linear``) is defined as a fixed sequence of
primitive ops and exists only so a backend can do that work in fewer kernel launches. No backend has to
implement one: where the selected backend does not, the core binds a **composite** (``accel_models.composites``)
that calls the same op table's primitive ops, so a model runs the same numbers on the same device either way.
A backend's native fused op is bound only where that backend also provides every op it fuses (e.g. the
whole KV-cache group for ``rope_and_write_kv_cache``, since it writes the backend's own cache layout);
otherwise the composite is bound. Strict mode does not require fused ops.

Versioning
----------
The API major version is :data:`accel_models.types.HOOKSPEC_API_VERSION` (1); the current minor version is
:data:`HOOKSPEC_API_MINOR_VERSION`. Each hook's docstring says the version that added it. A new hook is a
minor addition (backends without it fall back, or get a composite); a change of an existing hook's keywords
or math bumps the major version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from accel_models.types import BackendInfo, KVCacheLayout

PROJECT_NAME = "accel_models"
#: Minor version of the hookspec API (1.1: capture_graph; 1.2: prepare_linear and linear; 1.3: the fused
#: ops rope_and_write_kv_cache and act_and_mul_linear; 1.4: decoder_layer_decode; 1.5: moe_decoder_layer_decode;
#: 1.6: argmax, the greedy token of each logits row).
#: Backends declare only the major version.
HOOKSPEC_API_MINOR_VERSION = 6

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: The marker backends put on their op implementations: ``@accel_models.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class DeviceGraph(Protocol):
    """What :func:`accel_capture_graph` returns: a captured piece of device work (API 1.1)."""

    #: memory-pool handle to pass to later captures so they share memory (may be None)
    pool: Any

    def replay(self) -> Any:
        """Run the captured work again on the current input contents; returns the captured outputs."""


# ----------------------------------------------------------------------------------------------------
# Backend-level hooks
# ----------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def accel_backend_info() -> BackendInfo:
    """Describe the backend: name, device type, whether it is usable here and why not.

    Required of every backend. Must be cheap and must never raise: a backend whose runtime is missing
    (no torch_npu, no device) returns ``available=False`` with a ``reason`` that tells the user what is
    missing and how to install it. Import heavy dependencies lazily, inside op functions or here.

    Added in API 1.
    """


@hookspec(firstresult=True)
def accel_capture_graph(fn: Callable[[], Any], device: torch.device, pool: Any) -> DeviceGraph | None:
    """Capture ``fn`` as a device graph (CUDA graph, ACL graph, ...) that can be replayed, or return None.

    Not a numeric op: an optional backend-level hook. The runtime uses it to record one decode step of a
    fixed batch size (the model forward over the persistent input buffers) and replays it each step after
    copying the new inputs into those same buffers, so the launch overhead of every op is paid once.

    Args:
        fn: a callable taking no arguments that runs device work and returns a tensor or a tuple of
            tensors. It reads its inputs only from tensors whose addresses stay fixed (the runtime's
            persistent buffers, the weights, the KV caches); the implementation may call it more than once
            (e.g. warm-up runs before capture) and must leave its device state as after one call.
        device: the ``torch.device`` the work runs on.
        pool: None, or the ``pool`` attribute of a graph this backend returned before: captures that
            share a pool share their memory for intermediates (the runtime captures its batch sizes
            largest first with one pool and never replays two of them at once).

    Returns:
        None when the backend cannot capture graphs (the runtime then runs every step eagerly: the
        reference backend's answer). Otherwise an object with ``replay()``, which runs the captured work
        again on the current contents of the inputs and returns ``fn``'s outputs (on a real graph, the
        same tensors every time, overwritten by the next replay), and a ``pool`` attribute to pass to
        later captures (anything, including None). Raise ``RuntimeError`` with the reason when ``fn``
        cannot be captured (e.g. it synchronizes with the host); the runtime then falls back to eager.

    The runtime's ``fn`` runs its step inside a forward context
    (:func:`accel_models.context.current_forward_context`) whose attention metadata describes the step,
    including host copies of its lengths (``query_start_loc_host``, ``seq_lens_host``), and the runtime
    calls ``replay()`` inside one too: the captured metadata (the same tensors) with the replayed step's
    host lengths, padding included. (None of it is there while the hook itself runs, outside ``fn``.) A backend whose captured
    kernels take host-side arguments that change per step (ACL graphs: torch_npu's fused attention takes
    its sequence lengths as host lists) updates them from there before it replays; a CUDA graph needs
    nothing of it.

    Added in API 1.1 (backends written for API 1.0 fall back to the reference: no graphs).
    """


# ----------------------------------------------------------------------------------------------------
# Normalization and activations
# ----------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def accel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalization over the last dimension.

    Args:
        x: ``[..., hidden]``, float32/float16/bfloat16. Need not be contiguous.
        weight: ``[hidden]``, same dtype as ``x``.
        eps: added to the mean square.

    Returns:
        ``out`` of ``x``'s shape and dtype, a new tensor (``x`` is not modified)::

            var = mean(float32(x) ** 2, dim=-1, keepdim=True)
            out = (float32(x) * rsqrt(var + eps)).to(x.dtype) * weight

        (normalize in float32, cast back, then scale: the order Hugging Face's Llama uses).

    Added in API 1.
    """


@hookspec(firstresult=True)
def accel_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMS normalization.

    Args:
        x: ``[..., hidden]``, float32/float16/bfloat16.
        residual: same shape and dtype as ``x``.
        weight: ``[hidden]``.
        eps: as in :func:`accel_rms_norm`.

    Returns:
        ``(out, residual_out)`` where ``residual_out = x + residual`` (in ``x``'s dtype) and
        ``out = rms_norm(residual_out, weight, eps)``. May be in place: an implementation may write
        ``residual_out`` into ``residual`` and ``out`` into ``x`` (as vLLM's kernel does).

    Added in API 1.
    """


@hookspec(firstresult=True)
def accel_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Gated SiLU (SwiGLU): ``x`` is ``[..., 2 * d]``; returns ``silu(x[..., :d]) * x[..., d:]``, ``[..., d]``.

    Computed in at least float32, returned in ``x``'s dtype. ``x`` is not modified.

    Added in API 1.
    """


@hookspec(firstresult=True)
def accel_gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Gated GELU: ``x`` is ``[..., 2 * d]``; returns ``gelu(x[..., :d], approximate) * x[..., d:]``.

    ``approximate`` is ``"none"`` (erf form) or ``"tanh"`` (as ``torch.nn.functional.gelu``); anything
    else is a ValueError. ``x`` is not modified.

    Added in API 1.
    """


# ----------------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def accel_rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    rotary_dim: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply rotary position embedding to query and key.

    Args:
        positions: ``[num_tokens]`` int64, the absolute position of each token.
        query: ``[num_tokens, num_heads * head_size]`` (or ``[num_tokens, num_heads, head_size]``).
        key: ``[num_tokens, num_kv_heads * head_size]`` (or 3-D likewise), or None (query only).
        cos_sin_cache: ``[max_position, rotary_dim]``: row ``p`` is ``cat(cos(p * inv_freq), sin(p * inv_freq))``
            with ``inv_freq`` of length ``rotary_dim // 2`` (any scaling, e.g. YaRN's mscale, already folded in).
            float32 or the query's dtype.
        head_size: size of each head.
        rotary_dim: number of leading dims of each head that rotate (``<= head_size``, even); the rest
            pass through unchanged (partial rotary).
        is_neox: True for the NeoX / Llama style (rotate the two halves ``[:r/2]`` and ``[r/2:]``),
            False for the GPT-J style (rotate interleaved pairs ``(0, 1), (2, 3), ...``).

    Returns:
        ``(query_out, key_out)`` with the inputs' shapes and dtypes (``key_out`` None iff ``key`` is None).
        For each head, with ``c, s = cos_sin_cache[positions].chunk(2, -1)`` and ``x1, x2`` the two
        members of each rotated pair: ``x1' = x1 * c - x2 * s`` and ``x2' = x2 * c + x1 * s``.
        ``cos``/``sin`` are cast to the query's dtype before the products (as Hugging Face does).
        May be in place on ``query`` and ``key`` (as vLLM's kernel is). Positions outside
        ``[0, max_position)`` are a ValueError where the backend can check cheaply.

    Added in API 1.
    """


# ----------------------------------------------------------------------------------------------------
# Paged KV cache and attention (one group: bound from the same backend)
# ----------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def accel_kv_cache_layout(num_kv_heads: int, head_size: int, dtype: torch.dtype) -> KVCacheLayout:
    """Declare this backend's KV-cache layout for one attention layer of the given shape.

    Args:
        num_kv_heads: KV heads of the layer (on this rank).
        head_size: size of each head.
        dtype: the cache's dtype (usually the model's).

    Returns a :class:`~accel_models.types.KVCacheLayout`: the supported block sizes (tokens per block,
    the first being the default; e.g. ``(16, 32, 64, 128)`` for the reference, ``(128,)`` for Ascend's
    kernels) and the bytes one token slot occupies (keys and values together, including any padding),
    which the runtime uses to size a cache from a memory budget. Raises ValueError for a head size or dtype the backend's
    attention kernels do not support.

    Added in API 1.
    """


@hookspec(firstresult=True)
def accel_allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Allocate the KV cache of one attention layer: ``num_blocks`` blocks of ``block_size`` tokens.

    Args:
        num_blocks: blocks to allocate.
        block_size: tokens per block, one of the layout's ``block_sizes``.
        num_kv_heads, head_size, dtype: as given to ``accel_kv_cache_layout``.
        device: where the cache lives.

    Returns one tensor whose shape and layout are the backend's choice (only its own ``write_kv_cache``
    and ``paged_attention`` read it). Its contents are unspecified (attention never reads slots that
    were not written). ``block_size`` not among the layout's ``block_sizes`` is a ValueError.

    Added in API 1.
    """


@hookspec(firstresult=True)
def accel_write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write keys and values of new tokens into the paged cache, in place.

    Args:
        key: ``[num_tokens, num_kv_heads, head_size]``.
        value: ``[num_tokens, num_kv_heads, head_size]``.
        kv_cache: the tensor returned by ``allocate_kv_cache``; modified in place.
        slot_mapping: ``[num_tokens]`` int64; token ``i`` goes to slot ``slot_mapping[i]``, i.e. block
            ``slot // block_size``, offset ``slot % block_size``. A negative slot means "skip this
            token" (padding, e.g. in a captured graph).

    Added in API 1.
    """


@hookspec(firstresult=True)
def accel_paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """Causal attention of a mixed batch (prefills, chunked prefills, decodes) over the paged cache.

    The batch holds ``B`` sequences whose new query tokens are packed: sequence ``b`` owns query rows
    ``query_start_loc[b]:query_start_loc[b+1]`` (``q_len_b`` of them). Its context is ``seq_lens[b]``
    tokens (including its new tokens, whose K/V were already written with ``write_kv_cache``), stored
    in blocks ``block_table[b, 0], block_table[b, 1], ...``. A decode has ``q_len_b == 1``; a prefill
    ``q_len_b == seq_lens[b]``; a chunked prefill anything in between.

    Args:
        query: ``[num_tokens, num_heads, head_size]``; ``num_heads`` a multiple of the cache's
            ``num_kv_heads`` (GQA: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``).
        kv_cache: this layer's cache (the backend's own layout).
        block_table: ``[B, max_blocks_per_seq]`` int32; entries past a sequence's last block are ignored.
        seq_lens: ``[B]`` int32, context length of each sequence.
        query_start_loc: ``[B + 1]`` int32, cumulative query lengths starting at 0.
        max_query_len: ``max(q_len_b)`` (host int, for kernels that need it).
        max_seq_len: ``max(seq_lens)`` (host int).
        scale: softmax scale, usually ``head_size ** -0.5``.
        sliding_window: None, or ``W``: a query at position ``p`` sees keys at positions ``p - W < k <= p``
            (the ``W`` most recent tokens, itself included; Hugging Face's and vLLM's convention).
        logits_soft_cap: None, or ``c``: logits become ``c * tanh(logits / c)`` after scaling.

    Returns:
        ``[num_tokens, num_heads, head_size]`` in the query's dtype. Query row ``i`` of sequence ``b``
        sits at position ``p = seq_lens[b] - q_len_b + i`` and attends, causally, to the cached
        positions ``k <= p`` (within the window)::

            out = softmax(cap(scale * q . K[k]^T)) @ V[k]        # softmax in float32

    Added in API 1.
    """


# ----------------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def accel_moe_topk(
    router_logits: torch.Tensor,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    num_expert_group: int | None,
    topk_group: int | None,
    e_score_correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts.

    Args:
        router_logits: ``[num_tokens, num_experts]``, any float dtype.
        top_k: experts per token.
        scoring_func: ``"softmax"`` or ``"sigmoid"``: ``scores = softmax(float32(logits))`` or ``sigmoid(...)``.
        renormalize: divide the selected weights by their sum (Mixtral, Qwen3-MoE; DeepSeek's ``norm_topk_prob``).
        num_expert_group, topk_group: grouped top-k (DeepSeek-V2/V3): experts are split into
            ``num_expert_group`` equal groups; a group's score is its max choice score (or, when a
            correction bias is given, the sum of its two largest); only the ``topk_group`` best groups
            are eligible. Both None for plain top-k.
        e_score_correction_bias: None or ``[num_experts]`` float32 (DeepSeek-V3): added to the scores for
            *choosing* experts (``choice = scores + bias``) but not to the returned weights.
        routed_scaling_factor: multiplies the final weights (1.0 for none).

    Returns:
        ``(topk_weights, topk_ids)``, ``[num_tokens, top_k]`` float32 (float64 when ``router_logits`` is
        float64, so float64 models stay float64 end to end) and int32: the chosen experts (ordered by
        descending choice score) and their weights ``scores[ids]`` (renormalized if asked, then times
        ``routed_scaling_factor``). Ties break toward the lower expert id.

    Added in API 1.
    """


@hookspec(firstresult=True)
def accel_fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    """Apply the routed experts and sum their outputs weighted by the routing weights.

    Args:
        hidden_states: ``[num_tokens, hidden]``.
        w13: ``[num_local_experts, 2 * intermediate, hidden]``: each expert's gate projection
            (rows ``[:intermediate]``) stacked over its up projection (rows ``[intermediate:]``).
        w2: ``[num_local_experts, hidden, intermediate]``: each expert's down projection.
        topk_weights: ``[num_tokens, top_k]`` float32 (float64 for float64 hidden states).
        topk_ids: ``[num_tokens, top_k]`` int32 global expert ids.
        activation: ``"silu"`` (SwiGLU) or ``"gelu"`` (gated GELU, erf form).
        expert_map: None (all experts are local: local id = global id), or ``[num_global_experts]``
            int32 mapping a global id to its local index, ``-1`` for experts another rank holds
            (expert parallelism); those contribute nothing here.

    Returns:
        ``[num_tokens, hidden]`` in ``hidden_states``' dtype::

            out[t] = sum_j topk_weights[t, j] * w2[e] @ act_and_mul(w13[e] @ x[t]),  e = local(topk_ids[t, j])

        with the matmuls in the input dtype (float32 accumulation) and the weighted sum in float32.

    Added in API 1.
    """


# ----------------------------------------------------------------------------------------------------
# Dense linear layers (API 1.2)
# ----------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def accel_prepare_linear(weight: torch.Tensor) -> Any:
    """Prepare a linear layer's weight once, after it is loaded, for :func:`accel_linear`.

    The place for work a GEMM library wants done once per weight instead of once per call: packing into
    the blocked layout the kernel reads fastest (oneDNN on CPUs), choosing a tiling, building a descriptor.
    Called by the layers' ``process_weights_after_loading`` (the loader calls it after every weight of the
    model is loaded). Layers drop the prepared object whenever a weight loader writes to the weight, so a
    reloaded weight never meets a stale prepared copy; until it is prepared again they pass None.

    Args:
        weight: ``[n, k]`` float weight in ``nn.Linear``'s layout (output features first), on the
            backend's device. Must not be modified.

    Returns:
        Anything (opaque to everyone but this backend's :func:`accel_linear`, which receives it as
        ``prepared`` with the same ``weight``), or None when there is nothing to prepare. A prepared copy
        of the weight costs its memory on top of the weight's: say so in the backend's documentation.

    Added in API 1.2. ``prepare_linear`` and ``linear`` form one group (bound from the same backend, like
    the KV-cache ops). Neither is required: a backend without them gets plain ``torch`` matmul.
    """


@hookspec(firstresult=True)
def accel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prepared: Any
) -> torch.Tensor:
    """Dense linear layer: ``y = x @ weight.T + bias``.

    Args:
        x: ``[..., k]`` float; leading dimensions are flattened into ``m`` rows (``m`` is 1 to a few
            hundred rows in decode, thousands in prefill: backends may pick a kernel per ``m``).
        weight: ``[n, k]``, x's dtype (``nn.Linear`` layout; may be a non-contiguous view).
        bias: None or ``[n]``, x's dtype.
        prepared: None, or what this backend's :func:`accel_prepare_linear` returned for this same
            ``weight``. None must always work (compute from ``weight``).

    Returns:
        ``[..., n]`` of x's dtype: ``sum_j x[..., j] * weight[:, j] + bias``, accumulated in at least
        float32 (float64 for float64 inputs on the reference). Conformance compares against a float64
        product (unit-scale inputs, weights scaled by ``k ** -0.5``, ``k`` up to 1000) with 4x the
        tolerance of x's dtype, for ``prepared`` from :func:`accel_prepare_linear` and for None.

    Added in API 1.2 (backends written for earlier versions fall back to the reference: ``F.linear``).
    """


# ----------------------------------------------------------------------------------------------------
# Greedy sampling (API 1.6)
# ----------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def accel_argmax(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The index of the maximum of each row (a greedy decode step's token ids), written into ``out``.

    Args:
        x: ``[num_rows, num_cols]`` float (logits; the backend's float dtypes, as for the other ops),
            ``num_cols >= 1``; any strides.
        out: ``[num_rows]`` int64, contiguous, on ``x``'s device: written, nothing else is. It may be a view
            of a larger persistent buffer (the runtime's greedy decode graphs pass the first rows of their
            input-ids buffer, so the next step reads the ids where they were written).

    Returns:
        ``out``, holding ``torch.argmax(x, dim=-1)`` exactly: the **first** index of a row's maximum; a
        NaN counts as larger than every number (the row's first NaN wins); ``-0.0`` and ``0.0`` are equal.

    Optional in strict mode: the reference (pure torch, a few reductions) runs on every device. A native
    one exists to do it in one launch: the runtime captures it at the end of every greedy decode graph.

    Added in API 1.6.
    """


# ----------------------------------------------------------------------------------------------------
# W8A8 int8 quantization
# ----------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def accel_dynamic_int8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8 quantization.

    Args:
        x: ``[num_tokens, k]`` float (2-D; flatten leading dims first).

    Returns:
        ``(x_q, scales)``: ``x_q`` ``[num_tokens, k]`` int8 and ``scales`` ``[num_tokens, 1]`` float32::

            amax = max(|float32(x)|, dim=-1)
            scales = amax / 127                      # 0 for an all-zero row
            x_q = round_half_even(x * (127 / amax))  # 0 where amax == 0; always within [-127, 127]

        (the formulation of vLLM's kernel). Conformance allows an off-by-one in ``x_q`` where
        ``x * 127 / amax`` lies within float32 rounding of a half-integer.

    Added in API 1.
    """


@hookspec(firstresult=True)
def accel_int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """int8 x int8 matrix product with per-token and per-channel scales (W8A8).

    Args:
        a: ``[m, k]`` int8 activations (from :func:`accel_dynamic_int8_quant`).
        b: ``[n, k]`` int8 weights (the ``nn.Linear`` weight layout; may be a transposed view).
        scale_a: ``[m, 1]`` float32 per-token scales.
        scale_b: ``[n]`` float32 per-output-channel scales.
        out_dtype: float32, float16 or bfloat16.
        bias: None or ``[n]``.

    Returns:
        ``[m, n]`` of ``out_dtype``: ``(int32(a) @ int32(b).T) * scale_a * scale_b + bias``, products
        accumulated exactly in int32, scaling in float32.

    Added in API 1.
    """


# ----------------------------------------------------------------------------------------------------
# Fused ops (API 1.3): optional; without a native one the core binds a composite of the primitives above
# ----------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def accel_rope_and_write_kv_cache(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    rotary_dim: int,
    is_neox: bool,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of query and key, then the rotated keys and the values written into the paged cache.

    Exactly::

        query, key = rotary_embedding(positions, query, key, cos_sin_cache, head_size, rotary_dim, is_neox)
        write_kv_cache(key=key, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)
        return query, key

    (the attention layer's work before ``paged_attention``, in one call: vLLM fuses it the same way).

    Args:
        positions, cos_sin_cache, head_size, rotary_dim, is_neox: as in :func:`accel_rotary_embedding`.
        query: ``[num_tokens, num_heads, head_size]``.
        key: ``[num_tokens, num_kv_heads, head_size]``.
        value: ``[num_tokens, num_kv_heads, head_size]``; not modified.
        kv_cache, slot_mapping: as in :func:`accel_write_kv_cache` (``kv_cache`` modified in place; a
            negative slot skips the token's write, though its query and key are still rotated).
        Inputs may be strided views (e.g. q, k and v split from one fused qkv projection); the last
        dimension has unit stride.

    Returns:
        ``(query_out, key_out)``, the rotated query and key with the inputs' shapes and dtypes, as
        :func:`accel_rotary_embedding` returns them (may be in place on ``query`` and ``key``).

    Added in API 1.3. Optional: a backend without it gets the composite above, built from its own
    ``rotary_embedding`` and ``write_kv_cache``. A native implementation is bound only where the same
    backend provides ``rotary_embedding`` and the whole KV-cache group (it writes that backend's layout);
    otherwise the composite is. Conformance compares the returned query and key with the float64
    composite of the reference, and the cache through this backend's ``paged_attention``.
    """


@hookspec(firstresult=True)
def accel_act_and_mul_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prepared: Any, activation: str
) -> torch.Tensor:
    """Gated activation followed by a dense linear layer (a feed-forward block's down projection).

    Exactly::

        h = silu_and_mul(x)                         # activation == "silu"
        h = gelu_and_mul(x, approximate="none")     # activation == "gelu"
        h = gelu_and_mul(x, approximate="tanh")     # activation == "gelu_tanh"
        return linear(h, weight, bias, prepared)

    Args:
        x: ``[..., 2 * k]`` float, ``[gate | up]`` (the merged gate/up projection's output; may be strided).
        weight: ``[n, k]``, x's dtype (``nn.Linear`` layout).
        bias: None or ``[n]``.
        prepared: None, or what this backend's :func:`accel_prepare_linear` returned for ``weight``.
        activation: ``"silu"``, ``"gelu"`` (erf form) or ``"gelu_tanh"`` (tanh approximation); anything
            else is a ValueError.

    Returns:
        ``[..., n]`` of x's dtype. The composite rounds the activation ``h`` to x's dtype before the
        product (``act_and_mul`` returns x's dtype); a native implementation may round it or not (keep
        it within the ``linear`` tolerance either way). ``x`` is not modified.

    Added in API 1.3. Optional: a backend without it gets the composite above, built from its own
    activation ops and ``linear``. A native implementation is bound only where the same backend provides
    ``silu_and_mul``, ``gelu_and_mul`` and the linear group (``prepared`` is that backend's); otherwise the
    composite is. Conformance compares it with the float64 composite of the reference.
    """


@hookspec(firstresult=True)
def accel_decoder_layer_decode(
    hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
    input_norm_weight: torch.Tensor, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
    post_norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor, eps: float,
    cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_size: int, rotary_dim: int,
    is_neox: bool, scale: float, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, max_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A whole dense pre-norm decoder layer (Llama's) for a decode step, in as few launches as the backend
    can, or None: "not here, run the layer op by op".

    Exactly, where it returns a result (every intermediate in the hidden states' dtype, as the ops return
    them)::

        if residual is None: residual, x = hidden_states, rms_norm(hidden_states, input_norm_weight, eps)
        else:                x, residual = fused_add_rms_norm(hidden_states, residual, input_norm_weight, eps)
        q, k, v = linear(x, qkv_weight).split([num_heads, num_kv_heads, num_kv_heads] x head_size)
        q, k = rope_and_write_kv_cache(positions, q, k, v, cos_sin_cache, head_size, rotary_dim, is_neox,
                                       kv_cache, slot_mapping)
        a = paged_attention(q, kv_cache, block_table, seq_lens, query_start_loc=[0, 1, .., T],
                            max_query_len=1, max_seq_len, scale, no window, no soft cap)
        x, residual = fused_add_rms_norm(linear(a, o_weight), residual, post_norm_weight, eps)
        return act_and_mul_linear(linear(x, gate_up_weight), down_weight, activation="silu"), residual

    Args:
        hidden_states: ``[T, hidden]`` float, one new token per sequence (T sequences); ``residual``
            None (the first layer) or ``[T, hidden]``; ``positions`` ``[T]`` int64.
        input_norm_weight, post_norm_weight: ``[hidden]``. qkv_weight: ``[(num_heads + 2 num_kv_heads)
            head_size, hidden]``; o_weight ``[hidden, num_heads head_size]``; gate_up_weight ``[2 I,
            hidden]`` (gate rows, then up rows); down_weight ``[hidden, I]``; no biases.
        kv_cache, slot_mapping ``[T]``, block_table ``[T, max_blocks]``, seq_lens ``[T]``: as for
            ``paged_attention`` and ``write_kv_cache`` (this backend's layout); ``max_seq_len`` bounds
            ``seq_lens`` (a graph is captured with the longest one).

    Returns:
        ``(hidden_out, residual_out)``, each ``[T, hidden]``, with the new keys and values written at
        ``slot_mapping``; or None, having written nothing, for inputs the backend does not fuse (then the
        caller runs the layer op by op). Inputs are not modified.

    Added in API 1.4. Optional: without a native one the composite returns None; a native one is bound
    only where the same backend provides every op it replaces (the norms, rotary, the KV-cache group, the
    linear group, silu_and_mul). Conformance compares a non-None result with the float64 layer built from
    the reference's ops.
    """


@hookspec(firstresult=True)
def accel_moe_decoder_layer_decode(
    hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
    input_norm_weight: torch.Tensor, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
    post_norm_weight: torch.Tensor, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
    renormalize: bool, eps: float, cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_size: int,
    rotary_dim: int, is_neox: bool, scale: float, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    block_table: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A whole Mixtral-style decoder layer (Llama's attention, then softmax-routed SiLU experts without a
    shared expert) for a decode step, in as few launches as the backend can, or None: "not here, run the
    layer op by op".

    Exactly, where it returns a result (every intermediate in the hidden states' dtype, as the ops return
    them; the first lines are :func:`accel_decoder_layer_decode`'s)::

        ... x, residual = fused_add_rms_norm(linear(a, o_weight), residual, post_norm_weight, eps)
        topk_weights, topk_ids = moe_topk(linear(x, router_weight), top_k, scoring_func="softmax",
                                          renormalize, no expert groups, no correction bias, scaling 1.0)
        return fused_experts(x, w13, w2, topk_weights, topk_ids, activation="silu", expert_map=None), residual

    Args:
        hidden_states .. post_norm_weight, eps, cos_sin_cache .. max_seq_len: as for
            :func:`accel_decoder_layer_decode`.
        router_weight: ``[num_experts, hidden]`` (the router ``linear``'s weight, no bias).
        w13: ``[num_experts, 2 I, hidden]``, w2: ``[num_experts, hidden, I]``: as for
            :func:`accel_fused_experts` (every expert local: one rank, no expert parallelism).
        top_k, renormalize: as for :func:`accel_moe_topk`.

    Returns:
        ``(hidden_out, residual_out)``, each ``[T, hidden]``, with the new keys and values written at
        ``slot_mapping``; or None, having written nothing, for inputs the backend does not fuse.

    Added in API 1.5. Optional: without a native one the composite returns None; a native one is bound
    only where the same backend provides every op it replaces (the norms, rotary, the KV-cache group, the
    linear group, moe_topk, fused_experts). Conformance compares a non-None result with the float64 layer
    built from the reference's ops (where the float64 router's k-th and next scores are within the dtype's
    noise, with the layer of either choice).
    """
