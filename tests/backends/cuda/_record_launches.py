"""Pytest plugin for the interpreter subprocess (test_cuda_compile.py): records every Triton kernel launch
of accel_backend_cuda._triton_kernels (argument types, constexpr values, launch options) while
test_cuda_interpret.py runs, and writes them as JSON to $ACCEL_RECORD_LAUNCHES at the end."""

from __future__ import annotations

import inspect
import json
import os

import torch

RECORDS: dict[str, dict] = {}
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
           torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "launch_pdl")


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"ptr": _DTYPES[value.dtype]}
    if isinstance(value, bool):
        return {"value": value, "type": "i1"}
    if isinstance(value, int):
        return {"value": value, "type": "i32" if -2**31 <= value < 2**31 else "i64"}
    if isinstance(value, float):
        return {"value": value, "type": "fp32"}
    return {"value": value, "type": None}


class _Recorder:
    def __init__(self, name, kernel):
        self._name, self._kernel = name, kernel
        fn = getattr(kernel, "fn", kernel)
        params = inspect.signature(fn).parameters
        self._names = list(params)
        self._constexpr = {n for n, p in params.items() if str(p.annotation).endswith("constexpr")}

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            bound = dict(zip(self._names, args))
            bound.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
            rec = {"kernel": self._name, "args": {}, "constexprs": {},
                   "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}}
            for n in self._names:
                if n not in bound:
                    continue  # a defaulted constexpr
                if n in self._constexpr:
                    rec["constexprs"][n] = bound[n]
                else:
                    rec["args"][n] = _describe(bound[n])
            key = json.dumps({k: rec[k] for k in ("kernel", "constexprs", "options")}, sort_keys=True) + json.dumps(
                {n: d.get("ptr") or d.get("type") for n, d in rec["args"].items()}, sort_keys=True)
            RECORDS.setdefault(key, rec)
            return launch(*args, **kwargs)

        return run

    def __getattr__(self, item):
        return getattr(self._kernel, item)


def pytest_configure(config):
    import accel_backend_cuda._triton_kernels as k

    for name in dir(k):
        if name.endswith("_kernel") and hasattr(getattr(k, name), "__getitem__"):
            setattr(k, name, _Recorder(name, getattr(k, name)))


def pytest_unconfigure(config):
    path = os.environ.get("ACCEL_RECORD_LAUNCHES")
    if path:
        with open(path, "w") as f:
            json.dump(list(RECORDS.values()), f, default=str)
