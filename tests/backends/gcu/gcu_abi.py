"""Test data: the kernel ABI the GCU backend calls, as Enflame's public vllm-gcu sources declare it.

Schema strings are copied from https://github.com/EnflameTechnology/vllm-gcu at commit
7b5aaca941dd85086c9e0155cc9518de246256f8 (2026-02-11), file ``csrc/torch_bindings.cpp`` (the ``ops.def``
strings, adjacent C string literals joined, whitespace normalized to one space after each comma). ``flash_attn_varlen_func`` is a Python
function of Enflame's flash_attn package, which is not public: its parameters are those of vLLM's
flash-attention fork (vllm-project/flash-attention, commit 03ef28b388dc7f2c0c5fe8166dff4f98f07491dc,
``vllm_flash_attn/flash_attn_interface.py``), and the keywords vllm-gcu itself passes are taken from
``vllm_gcu/v1/attention/flash_attn.py`` at the vllm-gcu commit above.

:func:`check_call` checks one recorded kernel call against a schema: the op exists, no more positional
arguments than the schema has, keyword names exist, every argument without a default is given, and each
value has the schema's type.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

VLLM_GCU_REPO = "EnflameTechnology/vllm-gcu"
VLLM_GCU_COMMIT = "7b5aaca941dd85086c9e0155cc9518de246256f8"
VLLM_GCU_BINDINGS = "csrc/torch_bindings.cpp"

#: "namespace::op" -> schema, as declared by vllm-gcu (only the ops the backend calls).
GCU_SCHEMAS: dict[str, str] = {
    "_C::rms_norm": "rms_norm(Tensor! result, Tensor input, Tensor weight, float epsilon) -> ()",
    "_C::fused_add_rms_norm": "fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()",
    "_C::rotary_embedding": (
        "rotary_embedding(Tensor positions, Tensor! query, Tensor! key, int head_size, "
        "Tensor cos_sin_cache, bool is_neox) -> ()"
    ),
    "_C::silu_and_mul": "silu_and_mul(Tensor! result, Tensor input) -> ()",
    "_C::gelu_and_mul": "gelu_and_mul(Tensor! out, Tensor input) -> ()",
    "_C::gelu_tanh_and_mul": "gelu_tanh_and_mul(Tensor! out, Tensor input) -> ()",
    "_C::dynamic_scaled_int8_quant": "dynamic_scaled_int8_quant(Tensor! output, Tensor input, Tensor! scales, Tensor azp) -> ()",
    "_C::cutlass_scaled_mm": (
        "cutlass_scaled_mm(Tensor! out, Tensor x, Tensor weight, Tensor x_scale, Tensor w_scale, Tensor? bias) -> ()"
    ),
    "_C::fused_grouped_topk": (
        "fused_grouped_topk(Tensor! topk_weights, Tensor! topk_ids, Tensor gating_output, SymInt topk, "
        "bool renormalize, SymInt num_expert_group, SymInt topk_group, Tensor e_score_correction_bias, "
        "str scoring_func) -> ()"
    ),
    # Declared with ops.def("fused_moe_kernel", &fused_moe_kernel): torch infers the schema from the C++
    # signature in csrc/src/fused_moe_kernel.cpp (argument names are not part of an inferred schema; the
    # comments give the C++ names).
    "_C::fused_moe_kernel": (
        "fused_moe_kernel(Tensor _0, Tensor _1, Tensor _2, Tensor _3, Tensor _4, Tensor _5, Tensor _6, "
        "Tensor _7, bool _8, int _9, int _10, Tensor? _11) -> ()"
        # C, A, B, topk_weights, topk_ids, sorted_topk_ids, expert_ids, num_tokens_post_pad,
        # mul_routed_weight, topk, block_size, bias
    ),
    "_C_cache_ops::reshape_and_cache_flash": (
        "reshape_and_cache_flash(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
        "Tensor slot_mapping, str kv_cache_dtype, Tensor! k_scale, Tensor! v_scale) -> ()"
    ),
    "_moe_C::topk_softmax": (
        "topk_softmax(Tensor! topk_weights, Tensor! topk_indices, Tensor! token_expert_indices, "
        "Tensor gating_output) -> ()"
    ),
    "_moe_C::moe_align_block_size": (
        "moe_align_block_size(Tensor topk_ids, int num_experts, int block_size, Tensor! sorted_token_ids, "
        "Tensor! experts_ids, Tensor! num_tokens_post_pad) -> ()"
    ),
}

#: Non-optional ``Tensor`` arguments that vllm-gcu's own Python passes None to (the dispatcher turns None
#: into an undefined tensor, which these kernels test for), with where it does so.
NONE_ACCEPTED: dict[tuple[str, str], str] = {
    ("_C::dynamic_scaled_int8_quant", "azp"): "vllm_gcu/kernels/modular_experts.py:246 passes None (symmetric quant)",
    ("_C::fused_grouped_topk", "e_score_correction_bias"): (
        "vllm_gcu/kernels/fused_moe.py grouped_topk passes Optional[Tensor]; csrc/src/fused_grouped_topk.cpp "
        "branches on e_score_correction_bias.defined()"
    ),
}

#: Tensor arguments a kernel may receive non-contiguous (every other tensor must be contiguous, since the
#: TopsATen wrappers view raw buffers): vLLM's cutlass_scaled_mm takes the weight column-major.
LAYOUT_FLEXIBLE: dict[tuple[str, str], str] = {("_C::cutlass_scaled_mm", "weight"): "column-major [k, n]"}

#: Parameters of vllm_flash_attn.flash_attn_varlen_func (vllm-project/flash-attention @ 03ef28b3), in order;
#: the first six have no default.
FLASH_ATTN_VARLEN_PARAMS: tuple[str, ...] = (
    "q", "k", "v", "max_seqlen_q", "cu_seqlens_q", "max_seqlen_k", "cu_seqlens_k", "seqused_k", "q_v",
    "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
    "return_attn_probs", "block_table", "return_softmax_lse", "out", "scheduler_metadata", "q_descale",
    "k_descale", "v_descale", "num_splits", "fa_version", "s_aux", "cp_world_size", "cp_rank", "cp_tot_seqused_k",
)
FLASH_ATTN_VARLEN_REQUIRED = FLASH_ATTN_VARLEN_PARAMS[:6]
#: The keywords vllm-gcu's GCUFlashAttentionImpl.forward passes (vllm_gcu/v1/attention/flash_attn.py @ 7b5aaca9):
#: the subset known to work with Enflame's (non-public) implementation.
FLASH_ATTN_VARLEN_GCU_KEYWORDS: frozenset[str] = frozenset({
    "q", "k", "v", "out", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k", "softmax_scale",
    "causal", "alibi_slopes", "window_size", "block_table", "softcap", "fa_version",
})


def parse(schema: str, namespace: str | None = None) -> torch._C.FunctionSchema:
    if namespace is not None and "::" not in schema.split("(")[0]:
        schema = f"{namespace}::{schema}"
    return torch._C.parse_schema(schema)


def gcu_schema(qualified: str) -> torch._C.FunctionSchema:
    namespace = qualified.split("::")[0]
    return parse(GCU_SCHEMAS[qualified], namespace)


def _type_ok(type_str: str, value: Any, none_ok: bool) -> bool:
    optional = type_str.startswith("Optional[") or type_str.endswith("?")
    base = type_str[len("Optional["):-1] if type_str.startswith("Optional[") else type_str.rstrip("?")
    if value is None:
        return optional or (base == "Tensor" and none_ok)
    if base == "Tensor":
        return isinstance(value, torch.Tensor)
    if base in ("int", "SymInt"):
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base == "bool":
        return isinstance(value, bool)
    if base == "str":
        return isinstance(value, str)
    raise AssertionError(f"schema type {type_str!r} not handled by the checker")


def is_dense(t: torch.Tensor) -> bool:
    """Row-major strides for every dimension (stricter than is_contiguous, which ignores size-1 dims)."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    return tuple(reversed(expected)) == t.stride()


def check_call(qualified: str, schema: torch._C.FunctionSchema, args: Sequence[Any], kwargs: Mapping[str, Any],
               *, source: str, check_layout: bool = False) -> None:
    """Raise AssertionError unless ``args``/``kwargs`` fit ``schema`` (see the module docstring)."""
    params = list(schema.arguments)
    names = [p.name for p in params]
    where = f"{qualified} call vs {source} schema `{schema}`"
    assert len(args) <= len(params), f"{where}: {len(args)} positional arguments, the schema has {len(params)}"
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        assert key in names, f"{where}: unknown keyword {key!r}"
        assert key not in bound, f"{where}: {key!r} given twice"
        bound[key] = value
    for p in params:
        if p.name not in bound:
            assert p.has_default_value(), f"{where}: argument {p.name!r} (no default) is missing"
            continue
        value = bound[p.name]
        none_ok = (qualified, p.name) in NONE_ACCEPTED
        assert _type_ok(str(p.type), value, none_ok), \
            f"{where}: argument {p.name!r} expects {p.type}, got {type(value).__name__}"
        if check_layout and isinstance(value, torch.Tensor):
            dense = is_dense(value.t()) if (qualified, p.name) in LAYOUT_FLEXIBLE else is_dense(value)
            assert dense, f"{where}: tensor argument {p.name!r} is not contiguous (shape {tuple(value.shape)}, " \
                f"strides {value.stride()}; {LAYOUT_FLEXIBLE.get((qualified, p.name), 'row-major')} expected)"


def check_flash_attn_call(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """The backend's flash_attn_varlen_func call: keywords only, all of them ones vllm-gcu itself passes,
    every required parameter given, and the call binds to vllm_flash_attn's signature."""
    assert not args, f"flash_attn_varlen_func called with {len(args)} positional arguments; pass keywords"
    extra = set(kwargs) - FLASH_ATTN_VARLEN_GCU_KEYWORDS
    assert not extra, f"flash_attn_varlen_func keywords {sorted(extra)} are not among those vllm-gcu passes"
    missing = [p for p in FLASH_ATTN_VARLEN_REQUIRED if p not in kwargs]
    assert not missing, f"flash_attn_varlen_func call lacks required {missing}"
    sig = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          **({} if n in FLASH_ATTN_VARLEN_REQUIRED else {"default": None}))
        for n in FLASH_ATTN_VARLEN_PARAMS
    ])
    sig.bind(**kwargs)
    window = kwargs.get("window_size")
    assert window is None or (len(window) == 2 and all(isinstance(w, int) for w in window)), \
        f"window_size must be a pair of ints, got {window!r}"
