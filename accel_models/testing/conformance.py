"""Run the conformance checks of a backend: per op, hypothesis-drawn cases, against float64 reference.

Used by ``accel-models check``, by :class:`accel_models.testing.BackendConformance` (pytest) and by
anyone who wants a report object.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, reject, settings

from accel_models.backends import (
    COMPOSITE,
    OP_GROUPS,
    OP_NAMES,
    OPTIONAL_OPS,
    BackendError,
    OpTable,
    get_registry,
    resolve_ops,
)
from accel_models.testing import strategies as S
from accel_models.testing.checks import CHECKED_VIA, CHECKS, CheckResult


DEFAULT_DTYPES = (torch.float32, torch.bfloat16)


def strategy_for(op: str, ops: OpTable, quick: bool, dtype: torch.dtype = torch.float32):
    if op in ("rms_norm", "fused_add_rms_norm"):
        return S.norm_cases(quick=quick)
    if op in ("silu_and_mul", "gelu_and_mul"):
        return S.act_cases(quick=quick)
    if op == "rotary_embedding":
        return S.rotary_cases(quick=quick)
    if op == "paged_attention":
        layout = ops.kv_cache_layout(num_kv_heads=1, head_size=64, dtype=dtype)
        return S.attention_cases(block_sizes=tuple(layout.block_sizes), quick=quick)
    if op == "moe_topk":
        return S.moe_topk_cases(quick=quick)
    if op == "fused_experts":
        return S.fused_experts_cases(quick=quick)
    if op == "argmax":
        return S.argmax_cases(quick=quick)
    if op == "linear":
        return S.linear_cases(quick=quick)
    if op == "rope_and_write_kv_cache":
        layout = ops.kv_cache_layout(num_kv_heads=1, head_size=64, dtype=dtype)
        return S.rope_kv_cases(block_sizes=tuple(layout.block_sizes), quick=quick)
    if op == "act_and_mul_linear":
        return S.act_linear_cases(quick=quick)
    if op == "decoder_layer_decode":
        layout = ops.kv_cache_layout(num_kv_heads=1, head_size=64, dtype=dtype)
        return S.decoder_layer_cases(block_sizes=tuple(layout.block_sizes), quick=quick)
    if op == "moe_decoder_layer_decode":
        layout = ops.kv_cache_layout(num_kv_heads=1, head_size=64, dtype=dtype)
        return S.moe_decoder_layer_cases(block_sizes=tuple(layout.block_sizes), quick=quick)
    return S.quant_cases(quick=quick)


@dataclasses.dataclass
class OpReport:
    op: str
    provider: str
    native: bool
    status: str = "skip"  # pass | fail | skip | error
    worst: float = 0.0  # worst error / tolerance over all cases
    cases: int = 0
    dtypes: tuple[str, ...] = ()
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["worst"] = None if self.worst == float("inf") else self.worst
        return d


@dataclasses.dataclass
class ConformanceReport:
    backend: str
    ops: list[OpReport]
    models: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.status in ("pass", "skip") for r in self.ops) and all(m["status"] != "fail" for m in self.models)

    def failures(self) -> list[str]:
        return [r.op for r in self.ops if r.status in ("fail", "error")] + [m["model"] for m in self.models if m["status"] == "fail"]

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "passed": self.passed, "ops": [r.as_dict() for r in self.ops], "models": self.models}


class _ConformanceFailure(AssertionError):
    pass


def check_op(op: str, ops: OpTable, ref: OpTable, *, dtype: torch.dtype, device: Any, quick: bool = False,
             max_examples: int | None = None,
             case_filter: Callable[[str, dict], bool] | None = None) -> tuple[int, float, str | None]:
    """Run hypothesis-drawn cases of ``op``; returns (cases run, worst ratio, failure message or None)."""
    check = CHECKS[op]
    stats = {"cases": 0, "worst": 0.0}
    n = max_examples if max_examples is not None else (8 if quick else 30)

    @settings(max_examples=n, derandomize=True, deadline=None, database=None, print_blob=False,
              phases=(Phase.explicit, Phase.generate, Phase.shrink),
              suppress_health_check=list(HealthCheck))
    @given(case=strategy_for(op, ops, quick, dtype))
    def run(case: dict) -> None:
        if case_filter is not None and not case_filter(op, case):
            reject()  # a shape the backend declares unsupported: draw another
        result: CheckResult = check(case, ops, ref, dtype, device)
        stats["cases"] += 1
        stats["worst"] = max(stats["worst"], result.ratio)
        if not result.passed:
            raise _ConformanceFailure(f"{result.detail}; case={case}")

    try:
        run()
    except _ConformanceFailure as exc:
        return stats["cases"], stats["worst"], str(exc).splitlines()[0]
    return stats["cases"], stats["worst"], None


def run_conformance(
    backend: str,
    *,
    ops: Sequence[str] | None = None,
    quick: bool = False,
    dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES,
    device: Any = None,
    allow_unavailable: bool = False,
    native_only: bool = False,
    max_examples: int | None = None,
    case_filter: Callable[[str, dict], bool] | None = None,
) -> ConformanceReport:
    """Check every op (or ``ops``) of ``backend`` against the reference in float64.

    A fused op (API 1.3) the backend does not implement is bound as the composite of its own primitives:
    that is not a failure; it is checked like a fallback (skipped with ``native_only``).

    ``case_filter(op, case) -> bool`` declares which drawn cases the backend supports (e.g. kernels that
    need hidden sizes that are multiples of 16): others are redrawn, never counted as passes. Declare
    only real kernel limits, and document them: a filter hides exactly the inputs users could hit.
    """
    table = resolve_ops(backend, allow_unavailable=allow_unavailable, strict=False)
    ref = resolve_ops("reference", strict=True)
    if device is None:
        device = table.device_type if table.info.available else "cpu"
    wanted = list(ops) if ops else [o for o in OP_NAMES if o not in OPTIONAL_OPS]
    unknown = [o for o in wanted if o not in OP_NAMES]
    if unknown:
        raise BackendError(f"unknown op(s) {unknown}; ops are: {', '.join(OP_NAMES)}")
    reports: dict[str, OpReport] = {}
    for op in OP_NAMES:
        if op in OPTIONAL_OPS:  # backend-level hooks (graph capture) have no numeric contract to check
            continue
        if op not in wanted and not any(op in grp and any(o in grp for o in wanted) for grp in OP_GROUPS):
            continue
        provider = table.providers[op]
        reports[op] = OpReport(op, provider, native=provider == backend)
    for op, rep in reports.items():
        if op in CHECKED_VIA:
            continue
        if native_only and not rep.native:
            rep.message = ("composite of the backend's own ops: not checked (--native-only)"
                           if rep.provider == COMPOSITE else "fallback: not checked (--native-only)")
            continue
        used, unsupported = [], []
        for dtype in dtypes:
            if op in ("paged_attention", "rope_and_write_kv_cache", "decoder_layer_decode", "moe_decoder_layer_decode"):
                try:  # a backend may declare a cache dtype unsupported (ValueError, as the hookspec says)
                    table.kv_cache_layout(num_kv_heads=1, head_size=64, dtype=dtype)
                except ValueError:
                    unsupported.append(str(dtype).replace("torch.", ""))
                    continue
            try:
                cases, worst, failure = check_op(op, table, ref, dtype=dtype, device=device, quick=quick,
                                                 max_examples=max_examples, case_filter=case_filter)
            except Exception as exc:  # the op crashed on a valid case: that is a failure with its reason
                rep.status, rep.worst = "error", float("inf")
                rep.message = f"[{dtype}] {type(exc).__name__}: {exc}".splitlines()[0]
                rep.message += " | " + traceback.format_exc(limit=-2).strip().splitlines()[-1]
                break
            rep.cases += cases
            rep.worst = max(rep.worst, worst)
            used.append(str(dtype).replace("torch.", ""))
            if failure:
                rep.status = "fail"
                rep.message = f"[{str(dtype).replace('torch.', '')}] {failure}"
                break
        else:
            rep.status = "pass" if used else "skip"
            if rep.provider == COMPOSITE:
                rep.message = "composite of the backend's own ops"
            if unsupported:
                rep.message = f"KV-cache dtype(s) {', '.join(unsupported)} declared unsupported"
        rep.dtypes = tuple(used)
    # the KV-cache group shares paged_attention's verdict, prepare_linear linear's
    for op, via in CHECKED_VIA.items():
        if op in reports and via in reports:
            r, v = reports[op], reports[via]
            r.status, r.worst, r.cases, r.dtypes = v.status, v.worst, v.cases, v.dtypes
            r.message = f"checked through {via}"
    return ConformanceReport(backend, list(reports.values()))


def installed_backends() -> list[str]:
    return sorted(get_registry().records)
