"""Tiny random checkpoints for the runtime tests: saved with transformers' save_pretrained when available
(the HF-parity tests need transformers), else written directly (accel_models.runtime.demo)."""

from __future__ import annotations

import pytest
import torch

from accel_models.runtime.demo import build_tokenizer, llama_config, write_checkpoint

VOCAB = 384


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    """A tiny Llama saved by transformers (random init, initializer_range large enough that greedy
    tokens are not near-ties) with the demo tokenizer."""
    transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers")
    d = tmp_path_factory.mktemp("hf_llama")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d)
    build_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def hf_llama_model(hf_llama_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(hf_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny Llama written without transformers (demo writer), with tokenizer and generation config."""
    return write_checkpoint(tmp_path_factory.mktemp("llama"), llama_config(VOCAB, max_position_embeddings=256))


@pytest.fixture(scope="session")
def llm(llama_dir):
    from accel_models.runtime.llm import LLM

    with LLM(llama_dir, max_num_seqs=8, kv_cache_memory=4 << 20, seed=0) as engine:
        yield engine
