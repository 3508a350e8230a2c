"""What limits a persistent one-row GEMV on the GPU: weight streaming variants side by side (issue 11).

    python bench/cuda/bench_gemv_stream.py --out DIR [--quick]

The persistent decoder layer's projections stream bf16 weight rows through register tiles and reduce each
tile with ``tl.sum(w * x, axis=1)``. Nsight Compute found them issue-bound (5.9 cycles per issued
instruction, 2.68 TB/s in gate_up). The offline SASS of that loop shows why: Triton lays an ``[8, 2048]``
tile out with all eight warps along K, so every tile ends in five shuffle levels per row *and* a cross-warp
reduction through shared memory with CTA barriers (~940 instructions per thread per 64 KB of weights).

Each variant below is one persistent launch (one program per SM unless said), rows ``pid, pid + nprog, ..``
of a ``[N, K]`` bf16 weight, ``out = W @ x``, graph-timed over several launches; bandwidth = weight bytes
over time, next to the device's copy bandwidth and two peers (cuBLAS ``F.linear`` with one row, and the
backend's small-M split-K Triton kernel):

- ``cur``: the persistent layer's register tiles as they are (``_gemv_rows``: next tile loaded while one
  is reduced);
- ``chunk``: the same bytes as a ``[KC, TN, 256]`` tile (256-element K chunks outermost, so a warp owns
  whole rows: chunk sums are in-thread adds, one warp reduction per row), one or two tiles ahead (DEPTH).
  Triton 3.9 compiles it without shared memory; the H200's Triton 3.6 converts its layout through 64 KB
  of shared memory every iteration and it ran 10-20x slower (session 7);
- ``sum``: no per-tile reduction at all (elementwise accumulation; wrong output, an upper bound on what
  register streaming gives with 1 FMA a weight element);
- ``pipe``: the layer's streamed variant (``_stream_rows``: FMA over (tile, k chunk) steps that Triton's
  pipeliner stages through shared memory);
- ``dot``: 16-row tensor-core tiles over (tile, k chunk) steps, pipelined.

Every variant's output is compared with a float64 product (except ``sum``): one off by more than 1% is
flagged WRONG (``ok`` false in the JSON) and is not a data point. Results as JSON in DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backends" / "cuda"), str(ROOT / "backends" / "reference"), str(ROOT)]

import accel_backend_cuda._triton_kernels as TK  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_decode as bd  # noqa: E402
from _timing import graph_us  # noqa: E402


@triton.jit
def _cur_kernel(w_ptr, x_ptr, out_ptr, N, K: tl.constexpr, TN: tl.constexpr, K_PAD: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    k = tl.arange(0, K_PAD)
    x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    w = TK._weight_rows(w_ptr, pid, N, K, TN, K_PAD)
    TK._gemv_rows(w, w, w, w_ptr, x, out_ptr, pid, nprog, N, K, TN, K_PAD)


@triton.jit
def _chunk_tile(w_ptr, u, N, K: tl.constexpr, TN: tl.constexpr, KW: tl.constexpr):
    """Rows ``u * TN ..`` of ``[N, K]`` as ``[K // KW, TN, KW]`` (chunk, row, element)."""
    KC: tl.constexpr = K // KW
    c = tl.arange(0, KC)[:, None, None]
    r = u * TN + tl.arange(0, TN)[None, :, None]
    e = tl.arange(0, KW)[None, None, :]
    return tl.load(w_ptr + r.to(tl.int64) * K + c * KW + e, mask=r < N, other=0.0, eviction_policy="evict_first")


@triton.jit
def _chunk_kernel(w_ptr, x_ptr, out_ptr, N, K: tl.constexpr, TN: tl.constexpr, KW: tl.constexpr,
                  DEPTH: tl.constexpr, REDUCE: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    KC: tl.constexpr = K // KW
    c = tl.arange(0, KC)[:, None, None]
    e = tl.arange(0, KW)[None, None, :]
    x = tl.load(x_ptr + c * KW + e).to(tl.float32)
    n_tiles = tl.cdiv(N, TN)
    w0 = _chunk_tile(w_ptr, pid, N, K, TN, KW)
    w1 = w0
    if DEPTH == 2:
        w1 = _chunk_tile(w_ptr, pid + nprog, N, K, TN, KW)
    tot = tl.zeros([KC, TN, KW], dtype=tl.float32)
    for u in range(pid, n_tiles, nprog):
        if DEPTH == 2:
            w2 = _chunk_tile(w_ptr, u + 2 * nprog, N, K, TN, KW)
        else:
            w2 = _chunk_tile(w_ptr, u + nprog, N, K, TN, KW)
        if REDUCE:
            acc = tl.sum(tl.sum(w0.to(tl.float32) * x, axis=0), axis=1)
            rows = u * TN + tl.arange(0, TN)
            tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < N)
        else:
            tot += w0.to(tl.float32) * x
        if DEPTH == 2:
            w0 = w1
            w1 = w2
        else:
            w0 = w2
    if not REDUCE:
        s = tl.sum(tl.sum(tot, axis=0), axis=1)
        rows = pid * TN + tl.arange(0, TN)
        tl.store(out_ptr + rows, s.to(out_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _pipe_kernel(w_ptr, x_ptr, out_ptr, N, K: tl.constexpr, TN: tl.constexpr, BK: tl.constexpr,
                 STAGES: tl.constexpr):
    TK._stream_rows(x_ptr, w_ptr, out_ptr, tl.program_id(0), tl.num_programs(0), N, K, 0, TN, BK, STAGES, False,
                   True)


@triton.jit
def _dot_kernel(w_ptr, x_ptr, out_ptr, N, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                STAGES: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    mine = tl.cdiv(tl.maximum(n_tiles - pid, 0), nprog)
    m = tl.arange(0, 16)
    acc = tl.zeros([16, BN], dtype=tl.float32)
    for it in tl.range(0, mine * k_tiles, num_stages=STAGES):
        t = pid + (it // k_tiles) * nprog
        ki = it % k_tiles
        rows = t * BN + tl.arange(0, BN)
        offs_k = ki * BK + tl.arange(0, BK)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :], mask=(rows < N)[:, None],
                    other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + m[:, None] * 0 + offs_k[None, :], mask=(m == 0)[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(w))
        if ki == k_tiles - 1:
            tl.store(out_ptr + m[:, None] * 0 + rows[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=(m == 0)[:, None] & (rows < N)[None, :])
            acc = tl.zeros([16, BN], dtype=tl.float32)


def variants(k: int) -> list[tuple[str, dict]]:
    """Configurations that compile without local memory at this K (checked offline for sm90)."""
    tn = max(1, 16384 // k)  # the layer's 32 KB register tiles
    out = [("cur", {"TN": tn, "num_warps": 8}), ("cur", {"TN": 2 * tn, "num_warps": 8})]
    kw = 256 if k <= 2048 else 1024  # K chunk: a warp's 256 elements; wider K: 4 warps share a row
    rows = 8 * 256 // kw
    for depth in (1, 2):
        out.append(("chunk", {"TN": rows, "KW": kw, "DEPTH": depth, "num_warps": 8}))
    out.append(("chunk", {"TN": rows // 2, "KW": kw, "DEPTH": 2, "num_warps": 4}))
    out.append(("chunk", {"TN": rows // 2, "KW": kw, "DEPTH": 2, "num_warps": 4, "programs": 2}))
    out.append(("chunk", {"TN": rows, "KW": kw, "DEPTH": 1, "num_warps": 8, "programs": 2}))
    out.append(("sum", {"TN": rows, "KW": kw, "DEPTH": 1, "num_warps": 8}))
    out.append(("pipe", {"TN": 8, "BK": 512, "STAGES": 8, "num_warps": 8}))
    out.append(("dot", {"BN": 16, "BK": 256, "STAGES": 6, "num_warps": 4}))
    out.append(("dot", {"BN": 16, "BK": 512, "STAGES": 4, "num_warps": 4, "programs": 2}))
    out.append(("dot", {"BN": 32, "BK": 256, "STAGES": 6, "num_warps": 4}))
    return out


def launch(name: str, cfg: dict, w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, sms: int):
    n, k = w.shape
    grid = (sms * cfg.get("programs", 1),)
    nw = cfg["num_warps"]
    if name == "cur":
        return _cur_kernel[grid](w, x, out, n, K=k, TN=cfg["TN"], K_PAD=triton.next_power_of_2(k), num_warps=nw)
    if name in ("chunk", "sum"):
        return _chunk_kernel[grid](w, x, out, n, K=k, TN=cfg["TN"], KW=cfg["KW"], DEPTH=cfg["DEPTH"],
                                   REDUCE=name == "chunk", num_warps=nw)
    if name == "pipe":
        return _pipe_kernel[grid](w, x, out, n, K=k, TN=cfg["TN"], BK=cfg["BK"], STAGES=cfg["STAGES"], num_warps=nw)
    if name == "dot":
        return _dot_kernel[grid](w, x, out, n, K=k, BN=cfg["BN"], BK=cfg["BK"], STAGES=cfg["STAGES"], num_warps=nw)
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    res = {"device": {"name": props.name, "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
           "copy_TBps": bd.copy_bandwidth() / 1e12, "shapes": []}  # the floor's figure (bench_decode)
    print("copy TB/s", round(res["copy_TBps"], 3), flush=True)
    shapes = [("gate_up", 16384, 2048), ("down", 2048, 8192), ("qkv", 3072, 2048), ("o_proj", 2048, 2048),
              ("big", 65536, 2048)]
    if args.quick:
        shapes = shapes[:2]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for label, n, k in shapes:
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        x = torch.randn(k, device="cuda", generator=gen).to(torch.bfloat16)
        ref = (w.double() @ x.double())
        nbytes = w.numel() * 2
        calls = max(2, min(20, (256 << 20) // nbytes))
        row = {"shape": label, "N": n, "K": k, "MB": nbytes / 1e6, "results": []}
        peers = {"cublas": lambda: torch.nn.functional.linear(x[None], w)}
        import accel_backend_cuda as B

        plan = B.linear_plan(1, n, k, sms)
        if plan is not None:
            peers["small_m"] = lambda: TK.linear_small_m(x[None], w, None, plan)
        for pname, fn in peers.items():
            try:
                err = ((fn().double().flatten() - ref).norm() / ref.norm()).item()
                us = graph_us(lambda: [fn() for _ in range(calls)], calls)
                row["results"].append({"variant": pname, "us": us, "TBps": nbytes / us / 1e6, "rel_err": err})
            except Exception as exc:  # noqa: BLE001
                row["results"].append({"variant": pname, "error": repr(exc)[:300]})
        for name, cfg in variants(k):
            out = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
            try:
                ck = launch(name, cfg, w, x, out, sms)
                torch.cuda.synchronize()
                err = ((out.double() - ref).norm() / ref.norm()).item()
                us = graph_us(lambda: [launch(name, cfg, w, x, out, sms) for _ in range(calls)], calls)
                row["results"].append({"variant": name, "config": cfg, "us": us, "TBps": nbytes / us / 1e6,
                                       "rel_err": None if name == "sum" else err, "n_regs": ck.n_regs,
                                       "n_spills": ck.n_spills, "shared": ck.metadata.shared})
            except Exception as exc:  # noqa: BLE001
                row["results"].append({"variant": name, "config": cfg, "error": repr(exc)[:300]})
        for r in row["results"]:
            # a variant whose product is off is not a data point (bf16 output rounding is ~2e-3 here)
            r["ok"] = "error" not in r and (r.get("rel_err") is None or r["rel_err"] < 1e-2)
            print(label, "" if r["ok"] else "WRONG OR FAILED", json.dumps(r), flush=True)
        res["shapes"].append(row)
        del w
    (args.out / "gemv_stream.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
