"""Greedy generation and scoring through the paged-KV runtime equal transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from accel_models import SamplingParams
from accel_models.runtime.llm import LLM

NEW = 32
PROMPTS = [[1, 17, 45, 200, 33], [1, 99], [1, *range(40, 77)], [5, 6, 7, 8, 9, 10, 11, 12, 13]]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    new = out[0, len(prompt):].tolist()
    assert len(new) == n, "transformers stopped early"
    return new


@pytest.fixture(scope="module")
def expected(hf_llama_model):
    return [hf_greedy(hf_llama_model, p, NEW) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_llm(hf_llama_dir):
    with LLM(hf_llama_dir, max_num_seqs=4, kv_cache_memory=2 << 20) as llm:
        yield llm


GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def test_batch_of_different_lengths_matches_transformers(hf_llm, expected):
    outs = hf_llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" and o.finished for o in outs)
    assert hf_llm.kv.num_free_blocks == hf_llm.num_blocks


def test_requests_arriving_while_others_decode(hf_llm, expected):
    """Step API: requests join a running batch at different steps; tokens still equal transformers'."""
    llm = hf_llm
    arrivals = {0: [0], 3: [1], 7: [2], 8: [3]}  # step -> prompts added before it
    final: dict[str, list[int]] = {}
    streamed: dict[str, int] = {}
    step = 0
    while step <= max(arrivals) or llm.has_unfinished_requests():
        for i in arrivals.get(step, []):
            llm.add_request(f"r{i}", PROMPTS[i], GREEDY)
        for out in llm.step():
            n = len(out.outputs[0].token_ids)
            assert n == streamed.get(out.request_id, 0) + 1  # one new token per step, cumulative outputs
            streamed[out.request_id] = n
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
        step += 1
    assert [final[f"r{i}"] for i in range(4)] == expected
    assert llm.kv.num_free_blocks == llm.num_blocks


def test_chunked_prefill_matches_transformers(hf_llama_dir, expected):
    # a 16-token budget splits the 38-token prompt over three steps while the others decode
    with LLM(hf_llama_dir, max_num_seqs=4, max_num_batched_tokens=16, kv_cache_memory=2 << 20) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_preemption_when_cache_is_full_matches_transformers(hf_llama_dir, expected):
    """A cache of 8 blocks of 16 tokens cannot hold the four requests at once: the scheduler preempts
    (recompute) and every request still gets transformers' tokens; all blocks come back."""
    # bytes per token: 2 layers * 2 (K, V) * 2 kv heads * 16 head_dim * 4 bytes = 512 -> 8 blocks of 16
    with LLM(hf_llama_dir, max_num_seqs=4, kv_cache_memory=8 * 16 * 512, max_model_len=128) as llm:
        assert llm.num_blocks == 8
        outs = llm.generate(PROMPTS, GREEDY)
        assert llm.scheduler.num_preemptions > 0
        assert llm.kv.num_free_blocks == llm.num_blocks
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_score_matches_transformers_logits(hf_llm, hf_llama_model):
    seqs = [PROMPTS[2], PROMPTS[0], list(range(3, 130))]
    got = hf_llm.score(seqs)
    for seq, logits in zip(seqs, got):
        with torch.no_grad():
            ref = hf_llama_model(torch.tensor([seq])).logits[0].float()
        assert logits.shape == ref.shape
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert hf_llm.kv.num_free_blocks == hf_llm.num_blocks


def test_logprobs_match_transformers(hf_llm, hf_llama_model):
    prompt = PROMPTS[0]
    out = hf_llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3,
                                                   prompt_logprobs=2))[0]
    comp = out.outputs[0]
    seq = prompt + comp.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_llama_model(torch.tensor([seq])).logits[0].double(), dim=-1)
    assert len(comp.logprobs) == 8
    for i, (tok, pos) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert pos[tok].rank == 1  # greedy
        assert pos[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
        top = row.topk(3).indices.tolist()
        assert set(pos) == set(top)
    assert comp.cumulative_logprob == pytest.approx(sum(float(ref[len(prompt) - 1 + i, t])
                                                        for i, t in enumerate(comp.token_ids)), abs=1e-3)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        row = ref[j - 1]
        d = out.prompt_logprobs[j]
        tok = prompt[j]
        assert d[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert d[tok].rank == int((row > row[tok]).sum()) + 1
        assert set(row.topk(2).indices.tolist()) <= set(d)
