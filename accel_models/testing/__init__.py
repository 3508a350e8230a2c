"""Conformance kit for backend authors: hypothesis strategies, per-op checks against a float64 reference,
a pytest base class and the ``accel-models check`` command.

    from accel_models.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "mybackend"

Needs hypothesis (``pip install accel-models[testing]``).
"""

from accel_models.testing.conformance import ConformanceReport, OpReport, check_op, run_conformance
from accel_models.testing.suite import BackendConformance
from accel_models.testing.tolerances import DTYPE_TOLERANCES, OP_FACTORS, tolerance

__all__ = ["DTYPE_TOLERANCES", "OP_FACTORS", "BackendConformance", "ConformanceReport", "OpReport", "check_op",
           "run_conformance", "tolerance"]
