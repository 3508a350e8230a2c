"""Ablation of a decode step's latency-bound kernels: what each costs inside the captured graph.

Runs bench_decode.py's main() after replacing some of the CUDA backend's Triton launchers with no-ops that
return their inputs (so the graph holds no kernel for them), e.g. every rms_norm, the rope + KV write, the
activation, the attention. The tokens are then meaningless; only the times are of interest: the drop
against the unablated run is an upper bound on what fusing those kernels away could save.

    python bench/cuda/ablate_decode.py --ablate=norm,rope [bench_decode.py's arguments]   (--ablate= : none)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def ablate(names: list[str]) -> None:
    import accel_backend_cuda

    kern = accel_backend_cuda._kernels()
    if "norm" in names:
        kern.rms_norm = lambda x2, res2, weight, eps: (x2, res2 if res2 is not None else x2)
    if "rope" in names:
        kern.rope = lambda *args, **kwargs: None
    if "act" in names:
        kern.act_and_mul = lambda x2, act: x2[:, : x2.shape[1] // 2]
    if "attn" in names:
        kern.paged_attention = lambda query, *args, **kwargs: query
    unknown = set(names) - {"norm", "rope", "act", "attn", ""}
    if unknown:
        raise SystemExit(f"unknown --ablate entries {sorted(unknown)}: choose from norm, rope, act, attn")


def main() -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--ablate", default="")
    args, rest = ap.parse_known_args()
    ablate([n for n in args.ablate.split(",") if n])
    import bench_decode

    sys.argv = [sys.argv[0], *rest]
    return bench_decode.main()


if __name__ == "__main__":
    sys.exit(main())
