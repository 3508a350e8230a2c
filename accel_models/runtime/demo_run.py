"""``accel-models demo``: tiny random Llama and Mixtral checkpoints, generated on the selected backend and
checked against the reference backend (greedy tokens equal)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["The quick brown fox", "Paged attention keeps the keys", "Hello world! The capital of France is"]


def _generate(path: Path, backend: str | None, device: str | None, max_tokens: int):
    from accel_models.runtime.llm import LLM
    from accel_models.runtime.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(path, backend=backend, device=device, max_num_seqs=len(PROMPTS), kv_cache_memory=16 << 20) as llm:
        llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(PROMPTS, sp)
        dt = time.perf_counter() - t0
        return outs, dt, llm.ops


def run_demo(backend: str | None = None, max_tokens: int = 32, keep: str | None = None,
             device: str | None = None) -> int:
    from accel_models.backends import REFERENCE, BackendError, resolve_ops
    from accel_models.runtime.demo import llama_config, mixtral_config, write_checkpoint

    try:
        ops = resolve_ops(backend)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"backend: {ops.backend} ({ops.device_type}); ops falling back to the reference: "
          f"{', '.join(ops.fallbacks) or 'none'}")
    tmp = None
    if keep:
        root = Path(keep)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="accel-models-demo-")
        root = Path(tmp.name)
    ok = True
    try:
        models = {
            "tiny-llama": llama_config(384, max_position_embeddings=256),
            "tiny-mixtral": mixtral_config(384, max_position_embeddings=256),
        }
        for name, cfg in models.items():
            t0 = time.perf_counter()
            path = write_checkpoint(root / name, cfg, seed=0)
            print(f"\n== {name}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                  f"vocab {cfg['vocab_size']}" + (f", {cfg['num_local_experts']} experts top-{cfg['num_experts_per_tok']}"
                                                  if "num_local_experts" in cfg else "")
                  + f" (written in {time.perf_counter() - t0:.1f} s to {path})", file=sys.stdout)
            outs, dt, _ = _generate(path, ops.backend, device, max_tokens)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            for o in outs:
                print(f"  {o.prompt!r} -> {o.outputs[0].token_ids[:12]}{' ...' if len(o.outputs[0].token_ids) > 12 else ''}")
                print(f"      text: {o.outputs[0].text!r}")
            print(f"  {n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s on {ops.backend}")
            if ops.backend == REFERENCE:
                print("  agreement with the reference backend: this is the reference backend")
                continue
            ref, _, _ = _generate(path, REFERENCE, None, max_tokens)
            same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(outs, ref))
            tok_same = sum(x == y for a, b in zip(outs, ref) for x, y in zip(a.outputs[0].token_ids, b.outputs[0].token_ids))
            print(f"  agreement with the reference backend: {same}/{len(outs)} prompts identical, "
                  f"{tok_same}/{n} tokens")
            ok &= same == len(outs)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("\ndemo " + ("OK" if ok else "FAILED: greedy tokens differ from the reference backend"))
    return 0 if ok else 1
