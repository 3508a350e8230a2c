"""Decode GEMV choices at M = 1 on one GPU: cuBLAS through F.linear (what the CUDA backend uses for qkv/o_proj)
against cuBLAS's matrix-vector path (torch.mv) and the backend's small-M Triton kernel, per call.

    python bench/cuda/check_gemv.py

Llama-3.2-1B decode shapes, bf16. Each variant is a CUDA graph of 16 calls that rotate over 4 weight copies
(so L2, 50 MB, does not serve a weight twice in a row), median of 50 replays; floor = weight bytes / the
device copy bandwidth measured first. Results equal F.linear's within bf16 rounding (checked).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
for sub in ("", "backends/reference", "backends/cuda", "bench/cuda"):
    sys.path.insert(0, str(ROOT / sub))

import accel_backend_cuda as C  # noqa: E402
from _timing import graph_us  # noqa: E402

SHAPES = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048), "down_proj": (2048, 8192)}
CALLS, COPIES = 16, 4


def main() -> int:
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        y.copy_(x)
    b.record()
    b.synchronize()
    bw = 2 * x.numel() * 10 / (a.elapsed_time(b) / 1e3)
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    sms = C._num_sms(torch.device("cuda"))
    kern = C._kernels()
    bad = 0
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(COPIES)]
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        v = x1[0]
        plan = C.linear_plan(1, n, k, sms, {"linear": {**C.LINEAR_CONFIG, "min_bytes": 0}})
        ref = F.linear(x1, ws[0]).float()
        for label, got in (("mv", torch.mv(ws[0], v)[None]), ("triton", kern.linear_small_m(x1, ws[0], None, plan))):
            err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
            if err > 2e-2:
                bad += 1
                print(f"  MISMATCH {name} {label}: rel err {err:.3g}")
        t_lin = graph_us(lambda: [F.linear(x1, ws[i % COPIES]) for i in range(CALLS)], CALLS)
        t_mv = graph_us(lambda: [torch.mv(ws[i % COPIES], v) for i in range(CALLS)], CALLS)
        t_tr = graph_us(lambda: [kern.linear_small_m(x1, ws[i % COPIES], None, plan) for i in range(CALLS)], CALLS)
        floor = n * k * 2 / bw * 1e6
        print(f"  {name:13s} floor {floor:6.2f} us   F.linear {t_lin:6.2f}   torch.mv {t_mv:6.2f}   "
              f"triton small-M {t_tr:6.2f}  (plan {plan['BLOCK_N']}x{plan['BLOCK_K']} split {plan['SPLIT_K']})", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
