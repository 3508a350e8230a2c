"""Tensor parallelism on CPU (gloo): weight memory per rank and generation throughput, TP=2 vs TP=1.

Same model as bench_generate.py (random Llama: hidden 512, 8 layers, 8 heads, 2 KV heads, intermediate 1376,
vocab 32000, float32), 32-token prompts, 64 new tokens (greedy, EOS ignored), batch 1 and 16, through
``accel_models.LLM`` with the reference backend. Throughput is new tokens per second over the whole
generate call (prefill included), best of ``--repeat`` runs after a warm-up.

* TP=1: one process, torch's default threads (all cores); and again with cores / N threads, the
  per-rank thread count of TP=N (on a busy machine many threads on few cores lose to spinning).
* TP=N: N rank processes (the cores split evenly over them) driven by this process, which builds the
  inputs, receives rank 0's logits through a pipe and samples.

Weight memory: the bytes of the parameters each rank holds (exact), and each process's resident set
(VmRSS, which also counts torch itself and the KV cache).

    python bench/bench_tp.py [--tp 2] [--batches 1,16] [--repeat 3] [--moe]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT_LEN = 32
NEW_TOKENS = 64
CONFIG = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1376,
              max_position_embeddings=2048)
KV_CACHE = 64 << 20


def make_checkpoint(directory: Path, moe: bool) -> Path:
    from accel_models.runtime.demo import llama_config, write_checkpoint

    cfg = llama_config(32000, **CONFIG)
    if moe:  # Mixtral with 8 experts of a quarter of the dense intermediate size, top-2
        cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=8,
                   num_experts_per_tok=2, intermediate_size=CONFIG["intermediate_size"] // 4)
    return write_checkpoint(directory, cfg, seed=0, tokenizer=False)


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, 32000, (batch, PROMPT_LEN), generator=g).tolist()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(path: Path, tp: int, ep: bool, batches: list[int], repeat: int, threads: int | None = None) -> dict:

    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(path, tp, ep, batches, repeat)
    finally:
        torch.set_num_threads(default_threads)


def _run(path: Path, tp: int, ep: bool, batches: list[int], repeat: int) -> dict:
    from accel_models import LLM, SamplingParams

    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    llm = LLM(path, backend="reference", dtype="float32", max_num_seqs=max(batches), kv_cache_memory=KV_CACHE,
              max_model_len=256, tensor_parallel_size=tp, enable_expert_parallel=ep,
              enable_prefix_caching=False)  # rounds repeat their prompts; measure TP, not the prefix cache
    startup = time.perf_counter() - t0
    out: dict = {"startup_s": startup, "tok_s": {}, "tokens": {}}
    with llm:
        if tp == 1:
            out["param_bytes"] = [sum(p.numel() * p.element_size() for p in llm.model.parameters())]
            out["rss_mib"] = [rss_mib(os.getpid())]
        else:
            infos = llm.runner.model_info(all_ranks=True)
            out["param_bytes"] = [i["param_bytes"] for i in infos]
            out["rss_mib"] = [rss_mib(pid) for pid in llm.runner.executor.pids]
        for b in batches:
            ps = prompts(b)
            res = llm.generate(ps, sp)  # warm-up (and the tokens, to check TP=N agrees with TP=1)
            out["tokens"][b] = [r.outputs[0].token_ids for r in res]
            best = float("inf")
            for _ in range(repeat):
                t = time.perf_counter()
                res = llm.generate(ps, sp)
                best = min(best, time.perf_counter() - t)
                assert all(len(r.outputs[0].token_ids) == NEW_TOKENS for r in res)
            out["tok_s"][b] = b * NEW_TOKENS / best
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--moe", action="store_true", help="a Mixtral (8 experts, top-2) instead of the Llama; "
                                                       "adds an expert-parallel run")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cores = os.cpu_count() or 1
    per_rank = max(1, cores // args.tp)
    runs = [("TP=1", 1, False, None), (f"TP=1, {per_rank} thread(s)", 1, False, per_rank),
            (f"TP={args.tp}, {per_rank} thread(s) per rank", args.tp, False, None)]
    if args.moe:
        runs.append((f"TP={args.tp}, EP, {per_rank} thread(s) per rank", args.tp, True, None))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "model", args.moe)
        for name, tp, ep, threads in runs:
            results[name] = run(path, tp, ep, batches, args.repeat, threads)
            print(f"[{name} done]", file=sys.stderr)
    base = results["TP=1"]
    for name, r in results.items():
        same = all(r["tokens"][b] == base["tokens"][b] for b in batches)
        r["same_tokens"] = same
    model = (f"Mixtral (8 experts of intermediate {CONFIG['intermediate_size'] // 4}, top-2)" if args.moe
             else "Llama")
    results["TP=1"]["label"] = f"TP=1, {torch.get_num_threads()} thread(s)"
    print(f"date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}; model: {model} {CONFIG}, float32; "
          f"prompts {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens greedy; KV cache {KV_CACHE >> 20} MiB per rank; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print()
    print("| run | weights per rank (MiB) | RSS per process (MiB) | start-up (s) | "
          + " | ".join(f"batch {b} (tok/s)" for b in batches) + " | same tokens as TP=1 |")
    print("|" + "---|" * (5 + len(batches)))
    for name, r in results.items():
        w = " / ".join(f"{x / 2**20:.1f}" for x in r["param_bytes"])
        m = " / ".join(f"{x:.0f}" for x in r["rss_mib"])
        tps = " | ".join(f"{r['tok_s'][b]:.0f}" for b in batches)
        print(f"| {r.get('label', name)} | {w} | {m} | {r['startup_s']:.1f} | {tps} | {'yes' if r['same_tokens'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
