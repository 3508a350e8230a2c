"""DeepSeek decode on CPU: the zoo's latent MLA cache vs its expanded cache vs transformers, side by side.

Model: DeepSeek-V2-Lite's attention exactly (hidden 2048, 16 heads, no q low-rank, kv_lora_rank 512,
qk_nope 128 + qk_rope 64, v 128, yarn x40 with mscale 0.707) in 2 decoder layers (the first dense, of
intermediate 10944; the second MoE with 2 shared experts), with 16 routed experts (top-6) instead of 64 and a
32000-token vocabulary instead of 102400 so three copies fit in memory; random weights, float32, written once
by transformers' ``save_pretrained``.

Measured per engine: the decode step time (ms, median of ``--steps`` steps) of ``--batch`` sequences at a
context of ``--contexts`` tokens, after a prefill that is not timed; and the KV-cache bytes per token.
Engines: the zoo on ``--backend`` (default cpu) with ``mla_cache`` ``latent`` and ``expanded`` (through
``ModelRunner``, the paged path ``LLM`` uses), and transformers' DeepseekV2ForCausalLM (eager attention, its
DynamicCache of latents, re-expanded through kv_b_proj at every step). Rounds are interleaved (every engine
runs every context once per round), so background load hits all alike; reported: the best round, and the
median over rounds of the per-round ratio peer / ours-latent (> 1: the latent cache is faster).

    python bench/bench_deepseek.py [--contexts 512,2048] [--batch 1] [--steps 8] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=10944, num_hidden_layers=2, num_attention_heads=16,
    num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=16, num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=1408,
    first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
    max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1},
)


def make_checkpoint(root: Path) -> dict[str, Path]:
    import transformers

    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.02)
    paths = {}
    for kind in ("latent", "expanded"):
        path = root / kind
        model.config.mla_cache = kind
        model.save_pretrained(path)
        paths[kind] = path
    return paths


class Zoo:
    def __init__(self, path: Path, backend: str, max_tokens: int) -> None:
        from accel_models.loader import load_model
        from accel_models.runner import ModelRunner

        self.model = load_model(path, backend=backend, dtype="float32", device="cpu")
        self.max_tokens = max_tokens
        self.runner_cls = ModelRunner
        attn = self.model.model.layers[0].self_attn.attn
        self.kv_bytes_per_token = 2 * attn.num_kv_heads * attn.head_size * 4 * len(self.model.model.layers)

    def decode_ms(self, prompts: list[list[int]], steps: int) -> float:
        block = 16
        per_seq = -(-(self.max_tokens + steps + 1) // block)
        runner = self.runner_cls(self.model, num_blocks=per_seq * len(prompts) + 1, block_size=block,
                                 max_model_len=per_seq * block)
        out = runner.step(dict(enumerate(prompts)))
        times = []
        for _ in range(steps):
            batch = {sid: [int(out[sid][-1].argmax())] for sid in out}
            t = time.perf_counter()
            out = runner.step(batch)
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)


class HF:
    def __init__(self, path: Path) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                       attn_implementation="eager").eval()
        cfg = self.model.config
        self.kv_bytes_per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * cfg.num_hidden_layers

    @torch.no_grad()
    def decode_ms(self, prompts: list[list[int]], steps: int) -> float:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor(prompts)  # equal lengths: no padding
        out = self.model(ids, past_key_values=cache, use_cache=True)
        times = []
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            out = self.model(nxt, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_checkpoint(Path(tmp))
        engines = {"zoo, latent cache": Zoo(paths["latent"], args.backend, max(contexts)),
                   "zoo, expanded cache": Zoo(paths["expanded"], args.backend, max(contexts)),
                   "transformers 5 eager": HF(paths["latent"])}
        assert engines["zoo, latent cache"].model.model.layers[0].self_attn.latent_cache
        assert not engines["zoo, expanded cache"].model.model.layers[0].self_attn.latent_cache
        results: dict[str, dict[int, list[float]]] = {name: {c: [] for c in contexts} for name in engines}
        for _ in range(args.rounds):
            for c in contexts:
                prompts = [torch.randint(0, CONFIG["vocab_size"], (c,), generator=g).tolist()
                           for _ in range(args.batch)]
                for name, engine in engines.items():
                    results[name][c].append(engine.decode_ms(prompts, args.steps))
    base = "zoo, latent cache"
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, backend {args.backend}, batch {args.batch}, {args.rounds} rounds\n")
    print("| engine | KV bytes / token | " + " | ".join(f"ctx {c}: step ms (best)" for c in contexts) + " | "
          + " | ".join(f"ctx {c}: its time / latent's" for c in contexts) + " |")
    print("|---|---:|" + "---:|" * (2 * len(contexts)))
    for name, engine in engines.items():
        best = [min(results[name][c]) for c in contexts]
        ratio = [statistics.median(a / b for a, b in zip(results[name][c], results[base][c])) for c in contexts]
        print(f"| {name} | {engine.kv_bytes_per_token} | " + " | ".join(f"{b:.1f}" for b in best) + " | "
              + " | ".join(f"{r:.2f}" for r in ratio) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results},
                                        default=str, indent=1))


if __name__ == "__main__":
    sys.exit(main())
