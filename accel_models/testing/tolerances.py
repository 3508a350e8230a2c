"""The dtype tolerance table of the conformance kit.

A backend's output ``out`` (in the tested dtype) is compared with the reference computed in float64 on the
same, already rounded, inputs. An element passes when ``|out - ref| <= atol + rtol * |ref|``; the kit
reports the worst ratio ``|out - ref| / (atol + rtol * |ref|)`` (<= 1 passes).

``rtol`` follows FlagGems' resolution table (fp32 1.3e-6, fp16 1e-3, bf16 1.6e-2). ``atol`` absorbs
cancellation near zero and the rounding of intermediate results that the contract lets a backend keep in
the tested dtype (e.g. the gate/up activations of an expert): it is the dtype's resolution scaled by an
op factor for ops with long reductions (attention, experts), where a correct low-precision kernel rounds
more than once. The factors were set so that the reference backend itself, run in the tested dtype, passes
with margin, and a 1e-3 relative error in float32 does not.
"""

from __future__ import annotations

import torch

#: dtype -> (rtol, atol)
DTYPE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-12, 1e-12),
}

#: op -> multiplier of both rtol and atol (ops whose outputs go through long reductions or several roundings)
OP_FACTORS: dict[str, float] = {
    "rms_norm": 1.0,
    "fused_add_rms_norm": 1.0,
    "silu_and_mul": 1.0,
    "gelu_and_mul": 1.0,
    "rotary_embedding": 2.0,
    "paged_attention": 4.0,
    "moe_topk": 2.0,
    "fused_experts": 8.0,
    "argmax": 1.0,  # (exact: its check compares indices, not values)
    "dynamic_int8_quant": 1.0,
    "int8_scaled_mm": 1.0,
    "linear": 4.0,  # reductions over k up to 1000 (inputs of unit scale, weights scaled by k**-0.5)
    # fused ops (API 1.3): the returned query/key use rotary_embedding's factor; the cache, read back
    # through the backend's paged_attention, paged_attention's
    "rope_and_write_kv_cache": 4.0,
    "act_and_mul_linear": 4.0,
    "decoder_layer_decode": 8.0,  # a chain of nine ops, each rounding to the dtype
    "moe_decoder_layer_decode": 8.0,  # as decoder_layer_decode: the MoE feed-forward is as deep
}


def tolerance(op: str, dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for ``op`` outputs of ``dtype``."""
    rtol, atol = DTYPE_TOLERANCES[dtype]
    f = OP_FACTORS.get(op, 1.0)
    return rtol * f, atol * f


def error_ratio(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> float:
    """Worst ``|out - ref| / (atol + rtol |ref|)`` over all elements; inf for NaN/inf or a shape mismatch."""
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(o).all():
        return float("inf")
    if o.numel() == 0:
        return 0.0
    return float(((o - r).abs() / (atol + rtol * r.abs())).max())


def tolerance_table_markdown() -> str:
    """The table above as markdown (used by docs/writing-a-backend.md)."""
    lines = ["| dtype | rtol | atol |", "| --- | --- | --- |"]
    for dt, (rtol, atol) in DTYPE_TOLERANCES.items():
        lines.append(f"| {str(dt).replace('torch.', '')} | {rtol:g} | {atol:g} |")
    lines += ["", "| op | factor |", "| --- | --- |"]
    lines += [f"| {op} | {f:g} |" for op, f in OP_FACTORS.items()]
    return "\n".join(lines)
