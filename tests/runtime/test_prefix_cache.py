"""Prefix caching: computed full KV blocks are reused by later requests with the same token prefix.

The KV manager's bookkeeping is checked directly (sharing, reference counts, eviction order, accounting);
the engine is checked against transformers' greedy tokens (an independent implementation) with the cache
hit, under eviction pressure, and against the same engine with prefix caching off.
"""

from __future__ import annotations

import pytest
import torch

from accel_models import SamplingParams
from accel_models.runtime.kv_cache import CacheFullError, KVCacheManager
from accel_models.runtime.llm import LLM

BS = 4


def test_full_blocks_are_shared_and_reference_counted():
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    a = list(range(10))  # blocks [0..3], [4..7], and 2 tokens of a third
    kv.allocate_slots("a", 10)
    kv.commit("a", a, 10)
    assert kv.num_cached_blocks == 2  # only full blocks
    b = a[:8] + [99, 98, 97]
    assert kv.match_prefix("b", b, len(b) - 1) == 8
    assert kv.block_tables["b"] == kv.block_tables["a"][:2]  # the same blocks, shared
    kv.allocate_slots("b", len(b))
    assert kv.block_tables["b"][2] not in kv.block_tables["a"]  # its own block past the shared prefix
    kv.free("a")
    assert kv.num_free_blocks == 8 - 3  # b still holds the two shared blocks and its third
    kv.free("b")
    assert kv.num_free_blocks == 8 and kv.num_cached_blocks == 2  # cached, evictable, counted free


def test_a_prefix_key_is_the_whole_prefix_not_just_the_block():
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    kv.allocate_slots("a", 8)
    kv.commit("a", [1, 2, 3, 4, 5, 6, 7, 8], 8)
    kv.free("a")
    # same second block, different first block: nothing matches (block 2 is keyed by block 1's prefix)
    assert kv.match_prefix("b", [9, 9, 9, 9, 5, 6, 7, 8, 0], 8) == 0
    kv.free("b")
    # a prompt that starts with a cached block's tokens, but that block sat second in its prefix: no match
    assert kv.match_prefix("b2", [5, 6, 7, 8, 0], 4) == 0
    kv.free("b2")
    assert kv.match_prefix("c", [1, 2, 3, 4, 5, 6, 7, 8, 0], 8) == 8
    # never the last token: with max_tokens = len - 1 a prompt of exactly two blocks reuses only one
    kv.free("c")
    assert kv.match_prefix("d", [1, 2, 3, 4, 5, 6, 7, 8], 7) == 4


def test_eviction_takes_the_least_recently_freed_cached_block_and_forgets_it():
    kv = KVCacheManager(3, BS, enable_prefix_caching=True)
    for rid, toks in (("a", [1] * 4), ("b", [2] * 4), ("c", [3] * 4)):
        kv.allocate_slots(rid, 4)
        kv.commit(rid, toks, 4)
    for rid in ("b", "a", "c"):  # freed in this order: b is the least recently freed
        kv.free(rid)
    assert kv.num_free_blocks == 3 and kv.num_cached_blocks == 3
    kv.allocate_slots("x", 4)  # needs one block: b's is evicted
    assert kv.num_cached_blocks == 2
    assert kv.match_prefix("y", [2] * 4 + [0], 4) == 0
    assert kv.match_prefix("z", [1] * 4 + [0], 4) == 4
    with pytest.raises(CacheFullError):
        kv.allocate_slots("w", 3 * BS)  # a free, c cached-evictable = 1 free block; 3 wanted
    assert kv.num_free_blocks == 1


def test_without_prefix_caching_nothing_is_kept():
    kv = KVCacheManager(4, BS)
    kv.allocate_slots("a", 8)
    kv.commit("a", list(range(8)), 8)
    kv.free("a")
    assert kv.num_cached_blocks == 0 and kv.match_prefix("b", list(range(9)), 8) == 0


# ---------------------------------------------------------------------------------------------------
# engine
# ---------------------------------------------------------------------------------------------------

SYSTEM = [1, *range(100, 140)]  # a 41-token shared prefix: two full 16-token blocks
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def _hf_greedy(model, prompt, n):
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return out[0, len(prompt):].tolist()


def test_cache_hits_give_transformers_tokens(hf_llama_dir, hf_llama_model):
    prompts = [SYSTEM + [7, 8, 9], SYSTEM + [200, 201], SYSTEM[:20] + [5]]
    with LLM(hf_llama_dir, max_num_seqs=4, kv_cache_memory=2 << 20) as llm:
        first = llm.generate(prompts[0], GREEDY)[0].outputs[0].token_ids
        hits = llm.kv.prefix_hit_tokens
        rest = [o.outputs[0].token_ids for o in llm.generate(prompts[1:], GREEDY)]
        assert llm.kv.prefix_hit_tokens - hits == 32 + 16  # two blocks for the second, one for the third
        again = llm.generate(prompts[0], GREEDY)[0].outputs[0].token_ids  # its own generated tokens cached too
        assert llm.kv.num_free_blocks == llm.num_blocks
    assert [first, *rest] == [_hf_greedy(hf_llama_model, p, 20) for p in prompts]
    assert again == first


def test_a_fully_cached_prompt_still_computes_its_last_token(hf_llama_dir, hf_llama_model):
    """A prompt of exactly two blocks, seen before: one block is reused and the second recomputed (its
    last token's logits pick the first new token)."""
    prompt = SYSTEM[:32]
    with LLM(hf_llama_dir, max_num_seqs=4, kv_cache_memory=2 << 20) as llm:
        first = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
        hits = llm.kv.prefix_hit_tokens
        second = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
        assert llm.kv.prefix_hit_tokens - hits == 16
    assert first == second == _hf_greedy(hf_llama_model, prompt, 20)


def test_eviction_pressure_and_preemption_keep_tokens_exact(hf_llama_dir):
    """An 8-block cache, prompts sharing prefixes, sampled with seeds: prefix caching on gives exactly the
    tokens of prefix caching off, through evictions and preemptions."""
    prompts = [SYSTEM + [i, i + 1] for i in range(3, 9)] + [SYSTEM[:18] + [50 + i] for i in range(4)]
    sps = [SamplingParams(max_tokens=24, temperature=0.8, seed=i, ignore_eos=True) for i in range(len(prompts))]
    outs = {}
    for caching in (True, False):
        with LLM(hf_llama_dir, max_num_seqs=4, kv_cache_memory=8 * 16 * 512, max_model_len=128,
                 enable_prefix_caching=caching) as llm:
            assert llm.num_blocks == 8
            outs[caching] = [[o.outputs[0].token_ids for o in llm.generate(prompts, sps)] for _ in range(2)]
            if caching:
                assert llm.kv.prefix_hit_tokens > 0
            assert llm.kv.num_free_blocks == llm.num_blocks
    assert outs[True] == outs[False]
    assert outs[True][0] == outs[True][1]


def test_score_and_prompt_logprobs_compute_every_position(hf_llama_dir, hf_llama_model):
    with LLM(hf_llama_dir, max_num_seqs=4, kv_cache_memory=2 << 20) as llm:
        llm.generate(SYSTEM + [3], GREEDY)  # caches SYSTEM's two full blocks
        (logits,) = llm.score([SYSTEM + [4, 5]])
        out = llm.generate(SYSTEM + [6], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    with torch.no_grad():
        ref = hf_llama_model(torch.tensor([SYSTEM + [4, 5]])).logits[0].float()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert len(out.prompt_logprobs) == len(SYSTEM) + 1 and all(p is not None for p in out.prompt_logprobs[1:])
