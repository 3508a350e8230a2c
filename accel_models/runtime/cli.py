"""``accel-models generate`` and ``accel-models demo`` (registered by accel_models.cli).

Imports stay inside the command functions so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


class Progress:
    """A one-line progress display on stderr (rewritten in place on a terminal, one line per update otherwise)."""

    def __init__(self, stream: Any = None, min_interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.min_interval = min_interval
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        elif force:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self, text: str) -> None:
        if self.tty:
            self.update(text, force=True)
            self.stream.write("\n")
            self._width = 0
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="backend name (default: ACCEL_BACKEND, else auto)")
    p.add_argument("--dtype", help="parameter dtype (default: float32 on CPU, the checkpoint's elsewhere)")
    p.add_argument("--device", help="device (default: the backend's)")
    p.add_argument("--kv-cache-memory", type=int, default=None, metavar="BYTES",
                   help="KV-cache budget in bytes (default 256 MiB)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens at most")


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"backend": args.backend, "dtype": args.dtype, "device": args.device,
                          "max_model_len": args.max_model_len}
    if args.kv_cache_memory:
        kw["kv_cache_memory"] = args.kv_cache_memory
    return kw


def cmd_generate(args: argparse.Namespace) -> int:
    from accel_models.runtime.llm import LLM
    from accel_models.runtime.sampling_params import SamplingParams

    overrides = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                                   ("top_p", args.top_p), ("top_k", args.top_k), ("seed", args.seed))
                 if v is not None}
    try:  # bad flags fail before a model is loaded (checkpoint defaults are merged in after loading)
        SamplingParams(**overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prog = Progress()
    prog.update(f"loading {args.model} ...", force=True)
    t0 = time.perf_counter()
    try:
        llm = LLM(args.model, max_num_seqs=max(1, len(args.prompt)), **_engine_kwargs(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prog.done(f"loaded {args.model} on backend {llm.ops.backend!r} ({llm.device}, {llm.dtype}) "
              f"in {time.perf_counter() - t0:.1f} s; KV cache {llm.num_blocks} blocks of {llm.block_size}")
    with llm:
        try:
            params = SamplingParams(**{**llm.get_default_sampling_params().model_dump(), **overrides})
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        ids = []
        for i, prompt in enumerate(args.prompt):
            rid = f"cli-{i}"
            try:
                if args.chat:
                    if llm.tokenizer is None:
                        raise ValueError("--chat needs a tokenizer.json")
                    prompt_in: Any = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
                else:
                    prompt_in = prompt
                llm.add_request(rid, prompt_in, params)
            except (ValueError, RuntimeError) as exc:
                print(f"error: prompt {i}: {exc}", file=sys.stderr)
                return 2
            ids.append(rid)
        stream = len(ids) == 1  # one prompt: print its text as it is generated
        total, shown = 0, 0
        t1 = time.perf_counter()
        final: dict[str, Any] = {}
        while llm.has_unfinished_requests():
            for out in llm.step():
                if stream:
                    text = out.outputs[0].text
                    sys.stdout.write(text[shown:])
                    sys.stdout.flush()
                    shown = len(text)
                if out.finished:
                    final[out.request_id] = out
            total = sum(len(r.output_token_ids) for r in llm.scheduler.requests.values()) + \
                sum(len(o.outputs[0].token_ids) for o in final.values())
            if not stream:
                dt = time.perf_counter() - t1
                prog.update(f"generating: {total} tokens, {total / max(dt, 1e-9):.1f} tok/s, "
                            f"{len(final)}/{len(ids)} done")
        dt = time.perf_counter() - t1
        if stream:
            sys.stdout.write("\n")
        else:
            for rid, prompt in zip(ids, args.prompt):
                out = final[rid]
                print(f"--- prompt {rid}: {prompt!r}")
                print(out.outputs[0].text)
        reasons = ", ".join(f"{final[r].outputs[0].finish_reason}" for r in ids)
        prog.done(f"generated {total} tokens in {dt:.2f} s ({total / max(dt, 1e-9):.1f} tok/s); finish: {reasons}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from accel_models.runtime.demo_run import run_demo

    return run_demo(backend=args.backend, max_tokens=args.max_tokens, keep=args.keep, device=args.device)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint directory",
                              description="Generate text with accel_models.LLM from a checkpoint directory "
                                          "(config.json, *.safetensors, tokenizer.json).")
    p.add_argument("model", metavar="MODEL_DIR", help="checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens at most (default 16 or the "
                                                                "checkpoint's max_new_tokens)")
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: generation_config)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="per-request seed (reproducible sampling)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("demo", help="tiny Llama and Mixtral (random weights) generated on the selected "
                                           "backend, checked against the reference backend",
                              description="Build a tiny Llama and a tiny Mixtral (random weights, real "
                                          "safetensors + config.json + tokenizer.json) in a temporary "
                                          "directory, generate on the selected backend, print tokens, tokens/s "
                                          "and the agreement of greedy tokens with the reference backend.")
    p.add_argument("--backend", help="backend name (default: ACCEL_BACKEND, else auto)")
    p.add_argument("--device", help="device (default: the backend's)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    p.add_argument("--keep", metavar="DIR", help="write the checkpoints into DIR and keep them")
    p.set_defaults(func=cmd_demo)
