"""The runtime's greedy argmax on a GPU: same indices as torch.argmax, and its time (issue 11).

    python bench/cuda/check_argmax.py [--json OUT.json]

``accel_models.runtime.sampler.argmax_rows`` takes a two-level path off the CPU (a max per chunk of 256
columns, then a max over the chunk maxima). Checked against ``torch.argmax`` on the same GPU tensors, bf16
and float32, with many ties (few distinct values), NaNs (first NaN wins), -inf rows and a ragged tail (a
vocabulary 256 does not divide). Then timed, each as a CUDA graph of 16 calls (median of 50 replays, per
call), against torch.argmax of the float32 upcast: what a decode step paid before (the runner upcast the
logits, then torch.argmax).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import graph_us  # noqa: E402

from accel_models.runtime.sampler import argmax_rows  # noqa: E402

CALLS = 16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    failures, checked = [], 0
    for rows, vocab in ((1, 128256), (64, 128256), (5, 151936), (16, 32000)):
        for dtype in (torch.bfloat16, torch.float32):
            for trial in range(4):
                x = torch.randint(-4, 4, (rows, vocab), generator=g, device=dev).to(dtype)
                if trial == 1:
                    x[0, torch.randint(0, vocab, (2,), generator=g, device=dev)] = float("nan")
                if trial == 2:
                    x[-1] = float("-inf")
                if trial == 3:
                    x[:, -1] = 100.0  # the maximum in the last column (the ragged tail where 256 does not divide)
                    x[0, 3] = 100.0  # a tie with an early column: the first wins
                got, want = argmax_rows(x).tolist(), x.argmax(dim=-1).tolist()
                checked += 1
                if got != want:
                    failures.append(f"rows {rows} vocab {vocab} {dtype} trial {trial}: {got[:4]} != {want[:4]}")
    print(f"argmax_rows vs torch.argmax on {torch.cuda.get_device_name()}: {checked} cases, "
          f"{len(failures)} mismatches", flush=True)
    for f in failures:
        print("  MISMATCH", f)
    timings = []
    for rows in (1, 16, 64):
        x = torch.randn(rows, 128256, generator=g, device=dev).to(torch.bfloat16)
        for chunk in (256, 768, 1002, 2004, 4008):  # divisors of 128256
            assert argmax_rows(x, chunk).tolist() == x.argmax(dim=-1).tolist()
            print(f"  [{rows:>2}, 128256] bf16: argmax_rows chunk {chunk:>4} {graph_us(lambda: [argmax_rows(x, chunk) for _ in range(CALLS)], CALLS):6.2f} us",
                  flush=True)
        t_new = graph_us(lambda: [argmax_rows(x) for _ in range(CALLS)], CALLS)
        t_old = graph_us(lambda: [x.float().argmax(dim=-1) for _ in range(CALLS)], CALLS)
        t_arg = graph_us(lambda: [x.argmax(dim=-1) for _ in range(CALLS)], CALLS)
        timings.append({"rows": rows, "argmax_rows_bf16_us": t_new, "upcast_then_argmax_us": t_old,
                        "torch_argmax_bf16_us": t_arg})
        print(f"  [{rows:>2}, 128256] bf16: argmax_rows {t_new:6.2f} us   upcast + torch.argmax {t_old:6.2f} us   "
              f"torch.argmax {t_arg:6.2f} us", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"failures": failures, "checked": checked, "timings": timings}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
