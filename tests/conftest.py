"""Shared test setup: a fixed-seed hypothesis profile so a red CI run reproduces locally."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,  # fixed seed: the same examples every run
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The suite pins the reference backend unless told otherwise: other backends installed in the same
# environment (the example backend, say) would otherwise win auto-selection. Tests of auto-selection
# clear this with monkeypatch.
os.environ.setdefault("ACCEL_BACKEND", "reference")
