"""The greedy argmax of decode logits on one GPU: the CUDA backend's one-launch kernel (hook API 1.6) beside
the runtime's pure-torch two-level argmax (what the greedy decode graphs ran before, and what the reference
backend's argmax is) and ``torch.argmax``, side by side in one run.

    python bench/cuda/bench_argmax.py --out DIR [--shapes 1x128256,16x128256,64x128256,1x32000,64x32000]

Each variant is first checked against ``torch.argmax`` (random bf16 logits, rows with ties across chunks,
a NaN row, -0.0 vs 0.0); then 20 calls are captured in one CUDA graph and replayed (median of 30 replays,
CUDA events), so the figure is the device time of one call in a graph, as in the decode step. Writes
DIR/argmax.json and prints a table; exits 1 if any variant disagrees with torch.argmax.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def graph_us(fn, calls: int = 20, replays: int = 30) -> float:
    """Device time of one call of ``fn`` in a CUDA graph of ``calls`` calls (_timing.graph_us)."""
    from _timing import graph_us as timed

    return timed(lambda: [fn() for _ in range(calls)], calls, replays)


def cases(rows: int, cols: int, gen: torch.Generator) -> list[torch.Tensor]:
    x = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    t = x.clone()
    t[:, :] = torch.randint(-3, 4, (rows, cols), generator=gen).to(torch.bfloat16)  # ties everywhere
    t[0, cols - 1] = 3.0
    n = x.clone()
    n[0, cols // 2] = float("nan")
    z = -torch.rand(rows, cols, generator=gen).to(torch.bfloat16) - 1
    z[:, cols - 1], z[:, cols // 3] = 0.0, -0.0
    return [x, t, n, z]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="1x128256,16x128256,64x128256,1x32000,16x32000,64x32000")
    args = ap.parse_args()
    import accel_backend_cuda as C

    from accel_models.runtime.sampler import argmax_rows

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    variants = {
        "cuda argmax (1 launch)": lambda x, out: C.accel_argmax(x=x, out=out),
        "two-level torch (before)": lambda x, out: out.copy_(argmax_rows(x)),
        "torch.argmax": lambda x, out: out.copy_(x.argmax(dim=-1)),
    }
    rows_out, ok = [], True
    for shape in args.shapes.split(","):
        r, c = (int(v) for v in shape.split("x"))
        res = {"rows": r, "cols": c}
        for name, fn in variants.items():
            for x in cases(r, c, gen):
                xd = x.to(dev)
                out = torch.empty(r, dtype=torch.int64, device=dev)
                fn(xd, out)
                if not torch.equal(out.cpu(), x.argmax(dim=-1)):
                    ok = False
                    print(f"MISMATCH {name} at {shape}", flush=True)
            xd = cases(r, c, gen)[0].to(dev)
            out = torch.empty(r, dtype=torch.int64, device=dev)
            res[name] = graph_us(lambda: fn(xd, out))
        rows_out.append(res)
        print(json.dumps(res), flush=True)
    names = list(variants)
    print("\n| rows x cols (bf16) | " + " | ".join(f"{n} us" for n in names) + " | before / ours |")
    print("|---|" + "---|" * (len(names) + 1))
    for res in rows_out:
        print(f"| {res['rows']} x {res['cols']} | " + " | ".join(f"{res[n]:.2f}" for n in names)
              + f" | {res[names[1]] / res[names[0]]:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "argmax.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                      "rows": rows_out, "all_equal": ok}, indent=1))
    print("all variants equal torch.argmax" if ok else "SOME VARIANT DISAGREES WITH torch.argmax")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
