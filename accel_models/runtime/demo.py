"""Tiny random checkpoints for the demo (and tests): real safetensors, config.json and tokenizer.json.

Nothing here needs transformers: the tensors are written with Hugging Face's names straight into
``model.safetensors``, and the tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a
few sentences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A model zoo written once runs on any accelerator through backend plugins.",
    "Paged attention keeps the keys and values of every sequence in fixed-size blocks.",
    "Continuous batching lets new requests join the running batch at every step.",
    "Hello world! The capital of France is Paris, and the capital of Italy is Rome.",
    "Once upon a time there was a tiny language model that generated random tokens.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def build_tokenizer(directory: str | Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE on :data:`CORPUS` and save tokenizer.json + tokenizer_config.json in
    ``directory``; returns the vocabulary size (ids of ``<unk>``, ``<s>``, ``</s>``: 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"),
    }, indent=2))
    return tok.get_vocab_size()


def llama_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 num_kv_heads: int = 2, intermediate_size: int = 128, max_position_embeddings: int = 512,
                 **extra: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads, "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", **extra,
    }


def mixtral_config(vocab_size: int, *, num_experts: int = 4, top_k: int = 2, **kw: Any) -> dict[str, Any]:
    cfg = llama_config(vocab_size, **kw)
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=num_experts,
               num_experts_per_tok=top_k, sliding_window=None, router_aux_loss_coef=0.0)
    return cfg


def random_weights(config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors with Hugging Face's names for a Llama or Mixtral config.

    Linear weights are ``N(0, 1/fan_in)`` (so logits are spread out and greedy tokens are not near-ties),
    norms are ``1 + N(0, 0.1)``.
    """
    g = torch.Generator().manual_seed(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // nh
    V = config["vocab_size"]

    def lin(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / in_f**0.5

    def norm(n: int) -> torch.Tensor:
        return 1 + 0.1 * torch.randn(n, generator=g)

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(V, h, generator=g)}
    moe = "num_local_experts" in config
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = lin(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, nh * hd)
        if moe:
            w[p + "block_sparse_moe.gate.weight"] = lin(config["num_local_experts"], h)
            for e in range(config["num_local_experts"]):
                q = f"{p}block_sparse_moe.experts.{e}."
                w[q + "w1.weight"] = lin(inter, h)
                w[q + "w2.weight"] = lin(h, inter)
                w[q + "w3.weight"] = lin(inter, h)
        else:
            w[p + "mlp.gate_proj.weight"] = lin(inter, h)
            w[p + "mlp.up_proj.weight"] = lin(inter, h)
            w[p + "mlp.down_proj.weight"] = lin(h, inter)
    w["model.norm.weight"] = norm(h)
    w["lm_head.weight"] = lin(V, h) * 4  # sharper distributions
    return {k: v.to(dtype).contiguous() for k, v in w.items()}


def write_checkpoint(directory: str | Path, config: dict[str, Any], seed: int = 0,
                     generation_config: dict[str, Any] | None = None, tokenizer: bool = True) -> Path:
    """Write config.json, model.safetensors (random weights), generation_config.json and (optionally)
    the demo tokenizer into ``directory``; returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        vocab = build_tokenizer(directory)
        if vocab > config["vocab_size"]:
            raise ValueError(f"the tokenizer has {vocab} tokens; config vocab_size {config['vocab_size']} is smaller")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": 1, "eos_token_id": 2, **(generation_config or {})}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2))
    save_file(random_weights(config, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
