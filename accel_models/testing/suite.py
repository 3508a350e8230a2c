"""``BackendConformance``: subclass it in a test module to run the whole kit on a backend under pytest."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from accel_models.backends import OP_NAMES, OPTIONAL_OPS, resolve_ops
from accel_models.testing.checks import CHECKED_VIA

_CHECKED = [op for op in OP_NAMES if op not in OPTIONAL_OPS and op not in CHECKED_VIA]


class BackendConformance:
    """Every op's contract on ``backend``, one test per (op, dtype), against the float64 reference.

    Class attributes to set: ``backend`` (required); ``allow_unavailable`` (bind a backend that reports
    itself unusable, e.g. one tested through an emulation); ``device`` (default: the backend's device type,
    or "cpu" when unavailable); ``dtypes``; ``native_only`` (skip ops the backend falls back on);
    ``max_examples``. The pytest options ``--accel-quick`` and ``--accel-max-examples`` apply too.
    """

    backend: ClassVar[str]
    allow_unavailable: ClassVar[bool] = False
    device: ClassVar[Any] = None
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16)
    native_only: ClassVar[bool] = True
    max_examples: ClassVar[int | None] = None

    @classmethod
    def supports_case(cls, op: str, case: dict) -> bool:
        """Override to declare shapes the backend's kernels do not support (they are redrawn)."""
        return True

    @pytest.mark.parametrize("op", _CHECKED)
    @pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
    def test_op_conformance(self, op: str, dtype: str, request: pytest.FixtureRequest) -> None:
        from accel_models.testing.conformance import check_op

        dt = getattr(torch, dtype)
        if dt not in self.dtypes:
            pytest.skip(f"{dtype} not in {type(self).__name__}.dtypes")
        table = resolve_ops(self.backend, allow_unavailable=self.allow_unavailable)
        if self.native_only and table.providers[op] != self.backend:
            if table.providers[op] == "composite":  # a fused op the backend leaves to its composite: fine
                pytest.skip(f"{op} is bound as the composite of {self.backend}'s own ops")
            pytest.skip(f"{op} falls back to {table.providers[op]}")
        ref = resolve_ops("reference", strict=True)
        device = self.device or (table.device_type if table.info.available else "cpu")
        quick = bool(request.config.getoption("accel_quick", default=False))
        n = request.config.getoption("accel_max_examples", default=None) or self.max_examples
        cases, worst, failure = check_op(op, table, ref, dtype=dt, device=device, quick=quick, max_examples=n,
                                         case_filter=self.supports_case)
        assert failure is None, f"{self.backend}.{op} [{dtype}] fails its contract: {failure}"
        assert cases > 0

    @pytest.mark.parametrize("model", ["llama", "mixtral", "deepseek_v2", "deepseek_v3"])
    def test_model_matches_reference(self, model: str) -> None:
        """Tiny zoo models on the backend give the reference backend's logits (prefill + decode)."""
        from accel_models.testing.models import check_model

        table = resolve_ops(self.backend, allow_unavailable=self.allow_unavailable)
        device = self.device or (table.device_type if table.info.available else "cpu")
        result = check_model(model, self.backend, dtype=torch.float32, device=device,
                             allow_unavailable=self.allow_unavailable)
        assert result["status"] == "pass", f"{self.backend}: {result}"

    @pytest.mark.parametrize("model", ["llama", "mixtral"])
    def test_graphs_give_the_eager_tokens(self, model: str) -> None:
        """The backend's device graphs (capture_graph) replay decode steps with the eager steps' greedy tokens
        (skipped for a backend without graphs of its own, or none on this device)."""
        from accel_models.testing.models import check_graphs

        table = resolve_ops(self.backend, allow_unavailable=self.allow_unavailable)
        device = self.device or (table.device_type if table.info.available else "cpu")
        result = check_graphs(model, self.backend, dtype=torch.bfloat16, device=device,
                              allow_unavailable=self.allow_unavailable)
        if result["status"] == "skip":
            pytest.skip(f"{self.backend}: {result['message']}")
        assert result["status"] == "pass", f"{self.backend}: {result}"
