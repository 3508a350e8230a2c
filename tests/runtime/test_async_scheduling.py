"""Async scheduling (overlapped decode steps): the next decode step is launched before the current one's
tokens reach the host. Checked on the CPU (where it is off by default but runs the same code): tokens equal
transformers' greedy tokens (an independent implementation) and equal the engine without overlap through
end tokens, stop strings, seeds, penalties (which need the host), min_tokens, waiting requests and aborts;
every block is given back."""

from __future__ import annotations

import pytest
import torch

from accel_models import SamplingParams
from accel_models.runtime.llm import LLM

PROMPTS = [[5, 9, 14, 30, 2 + i] * (1 + i % 3) for i in range(6)]


def _hf_greedy(model, prompt, n):
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # else generate() takes the model's EOS and stops there
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    finally:
        model.generation_config.eos_token_id = saved
    toks = out[0, len(prompt):].tolist()
    assert len(toks) == n
    return toks


def _engine(path, overlap, **kw):
    kw.setdefault("max_num_seqs", 4)
    return LLM(path, kv_cache_memory=2 << 20, async_scheduling=overlap, **kw)


def test_greedy_with_stop_tokens_matches_transformers(hf_llama_dir, hf_llama_model):
    """Each request stops at a token transformers generates mid-way (so rows of the overlapped next step
    are dropped at different steps), or by length at different max_tokens."""
    ref = [_hf_greedy(hf_llama_model, p, 24) for p in PROMPTS]
    sps, want = [], []
    for i, toks in enumerate(ref):
        if i % 2:  # stop at the first occurrence of a token seen after a few steps
            stop = toks[3 + i]
            cut = toks.index(stop) + 1
            sps.append(SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop], detokenize=False))
            want.append(toks[:cut])
        else:
            sps.append(SamplingParams(max_tokens=10 + i, temperature=0.0, ignore_eos=True, detokenize=False))
            want.append(toks[: 10 + i])
    with _engine(hf_llama_dir, True) as llm:  # 6 requests, 4 at a time: some wait, then join
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sps)]
        assert llm.overlapped_steps >= 5  # the overlap really ran (between joins and finishes)
        assert llm.kv.num_free_blocks == llm.num_blocks
    assert got == want


def test_overlap_gives_the_tokens_of_no_overlap(hf_llama_dir):
    """Seeded sampling (on the device), a penalty (needs the host: no overlap while it runs), min_tokens,
    stop strings and an end token: the same outputs and finish reasons with and without overlap."""
    sps = [
        SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=1),
        SamplingParams(max_tokens=20, temperature=0.7, top_p=0.9, min_p=0.05, seed=2, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=18, temperature=0.0, min_tokens=6, ignore_eos=False),
        SamplingParams(max_tokens=20, temperature=0.8, seed=5, stop=["e"], ignore_eos=True),
    ]
    prompts = ["hello world", "the cat sat", "one two three", "abc", "a b a b a"]
    outs = {}
    for overlap in (False, True):
        with _engine(hf_llama_dir, overlap, max_num_seqs=8) as llm:
            res = llm.generate(prompts, sps)
            outs[overlap] = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in res]
            assert llm.kv.num_free_blocks == llm.num_blocks
            if overlap:
                assert llm.overlapped_steps > 0
            else:
                assert llm.overlapped_steps == 0
    assert outs[True] == outs[False]
    assert any(r == "stop" for _, _, r in outs[True]) and any(r == "length" for _, _, r in outs[True])


def test_step_api_abort_while_a_step_is_in_flight(hf_llama_dir, hf_llama_model):
    """A server aborts a request between steps while the next step (with its row) is already launched:
    the request gets no more tokens, its blocks come back, the others are unaffected."""
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, detokenize=False)
    with _engine(hf_llama_dir, True) as llm:
        for i in range(3):
            llm.add_request(f"r{i}", PROMPTS[i], sp)
        tokens: dict[str, list[int]] = {}
        aborted_at = None
        for _ in range(200):
            if not llm.has_unfinished_requests():
                break
            for o in llm.step():
                tokens[o.request_id] = o.outputs[0].token_ids
            if aborted_at is None and len(tokens.get("r1", [])) == 5:
                assert llm._inflight is not None  # the next step, with r1's row, is on its way
                aborted_at = list(tokens["r1"])
                assert llm.abort("r1").outputs[0].finish_reason == "abort"
        assert llm.kv.num_free_blocks == llm.num_blocks
    assert tokens["r1"] == aborted_at
    for i in (0, 2):
        assert tokens[f"r{i}"] == _hf_greedy(hf_llama_model, PROMPTS[i], 16)


def test_an_error_mid_generation_leaves_nothing_in_flight(hf_llama_dir, monkeypatch):
    with _engine(hf_llama_dir, True) as llm:
        sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, detokenize=False)
        calls = {"n": 0}
        real = llm._complete

        def failing(cur, finished_only):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
            return real(cur, finished_only)

        monkeypatch.setattr(llm, "_complete", failing)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(PROMPTS[:3], sp)
        assert llm._inflight is None and llm.kv.num_free_blocks == llm.num_blocks
        monkeypatch.setattr(llm, "_complete", real)
        again = llm.generate(PROMPTS[:3], sp)
        assert [len(o.outputs[0].token_ids) for o in again] == [30, 30, 30]


def test_a_step_launched_for_requests_that_all_ended_is_not_left_behind(hf_llama_dir, hf_llama_model):
    """The last request stops on a token: the step already launched after it is dropped at once (not
    left for the next generate or step() to complete as an empty step)."""
    toks = _hf_greedy(hf_llama_model, PROMPTS[0], 12)
    stop = toks[6]
    sp = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop], detokenize=False)
    with _engine(hf_llama_dir, True) as llm:
        out = llm.generate(PROMPTS[0], sp)[0].outputs[0]
        assert out.token_ids == toks[: toks.index(stop) + 1] and out.finish_reason == "stop"
        assert llm.overlapped_steps > 0 and llm._inflight is None
        assert llm.kv.num_free_blocks == llm.num_blocks


def test_async_scheduling_needs_device_events():
    """Off the CPU the overlap waits on device events; a device without them runs synchronously by
    default and refuses an explicit async_scheduling=True with a clear message."""
    from types import SimpleNamespace

    fake = SimpleNamespace(device=torch.device("meta"))  # torch has no events for it
    assert LLM._resolve_async_scheduling(fake, None) is False
    assert LLM._resolve_async_scheduling(fake, False) is False
    with pytest.raises(ValueError, match="needs device events"):
        LLM._resolve_async_scheduling(fake, True)
    cpu = SimpleNamespace(device=torch.device("cpu"))
    assert LLM._resolve_async_scheduling(cpu, None) is False and LLM._resolve_async_scheduling(cpu, True) is True
