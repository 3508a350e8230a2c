"""LLM engine behaviour: stops, seeds, abort accounting, bad input, generation_config, the step API."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from accel_models import SamplingParams
from accel_models.runtime.demo import llama_config, write_checkpoint
from accel_models.runtime.kv_cache import BlockAllocator, CacheFullError, KVCacheManager
from accel_models.runtime.llm import LLM, check_stop_strings

PROMPT = "The quick brown fox"


def greedy(**kw):
    return SamplingParams(temperature=0.0, **{"max_tokens": 24, "ignore_eos": True, **kw})


# -- allocator -----------------------------------------------------------------------------------------


def test_block_allocator_accounting():
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert sorted(x) == [0, 1, 2] and a.num_free == 1
    with pytest.raises(CacheFullError):
        a.allocate(2)
    assert a.num_free == 1  # a failed allocation takes nothing
    a.free(x)
    assert a.num_free == 4
    with pytest.raises(ValueError, match="not allocated"):
        a.free([0])
    kv = KVCacheManager(4, block_size=16)
    kv.allocate_slots("a", 17)
    assert kv.block_tables["a"] and len(kv.block_tables["a"]) == 2
    kv.allocate_slots("a", 32)
    assert len(kv.block_tables["a"]) == 2 and kv.num_free_blocks == 2
    assert not kv.can_hold("b", 48)
    kv.free("a")
    assert kv.num_free_blocks == 4


# -- stops ---------------------------------------------------------------------------------------------


def test_stop_strings_truncate_text_as_vllm(llm):
    base = llm.generate(PROMPT, greedy())[0].outputs[0]
    text = base.text
    assert len(text) > 8
    stop = text[5:8]
    first = text.find(stop)
    out = llm.generate(PROMPT, greedy(stop=[stop]))[0].outputs[0]
    assert out.text == text[:first]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == base.token_ids[: len(out.token_ids)]
    incl = llm.generate(PROMPT, greedy(stop=stop, include_stop_str_in_output=True))[0].outputs[0]
    assert incl.text == text[: first + len(stop)]


def test_check_stop_strings_unit():
    assert check_stop_strings("hello world", 2, ["wor"], False) is None  # "wor" does not overlap the new "ld"
    assert check_stop_strings("hello world", 3, ["wor"], False) == ("wor", 6)  # it overlaps the new "rld"
    assert check_stop_strings("hello world", 4, ["wor"], False) == ("wor", 6)
    assert check_stop_strings("hello world", 4, ["wor"], True) == ("wor", 9)
    assert check_stop_strings("hello world", 3, ["rld"], True) == ("rld", -1)
    assert check_stop_strings("abc", 0, ["a"], False) is None


def test_stop_token_ids_eos_min_tokens_and_max_tokens(llm):
    base = llm.generate(PROMPT, greedy())[0].outputs[0]
    tok = base.token_ids[5]
    first = base.token_ids.index(tok)
    out = llm.generate(PROMPT, greedy(stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    # min_tokens masks the stop token until enough tokens exist, so the output differs from then on
    later = llm.generate(PROMPT, greedy(stop_token_ids=[tok], min_tokens=first + 2))[0].outputs[0]
    assert len(later.token_ids) >= first + 2 and tok not in later.token_ids[: first + 2]
    short = llm.generate(PROMPT, greedy(max_tokens=3))[0].outputs[0]
    assert short.token_ids == base.token_ids[:3] and short.finish_reason == "length"


def test_several_eos_ids_from_generation_config(tmp_path):
    d = write_checkpoint(tmp_path / "m", llama_config(384, max_position_embeddings=128))
    with LLM(d, max_num_seqs=2, kv_cache_memory=1 << 20) as llm:
        base = llm.generate(PROMPT, greedy())[0].outputs[0]
    eos2 = base.token_ids[4]
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, eos2]
    (d / "generation_config.json").write_text(json.dumps(gen))
    with LLM(d, max_num_seqs=2, kv_cache_memory=1 << 20) as llm:
        assert eos2 in llm.eos_token_ids and 2 in llm.eos_token_ids
        out = llm.generate(PROMPT, greedy(ignore_eos=False))[0].outputs[0]
        assert out.token_ids == base.token_ids[: base.token_ids.index(eos2) + 1]
        assert out.finish_reason == "stop" and out.stop_reason is None
        # the eos token is not in the text
        assert out.text == llm.tokenizer.decode(out.token_ids[:-1])


def test_generation_config_defaults(tmp_path):
    d = write_checkpoint(tmp_path / "m", llama_config(384, max_position_embeddings=128),
                         generation_config={"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 7})
    with LLM(d, max_num_seqs=2, kv_cache_memory=1 << 20) as llm:
        sp = llm.get_default_sampling_params()
        assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (0.6, 0.9, 20, 7)
        out = llm.generate([PROMPT])[0]
        assert len(out.outputs[0].token_ids) <= 7


# -- seeds ---------------------------------------------------------------------------------------------


def test_seeds_reproduce_across_batch_compositions(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPT, sp)[0].outputs[0].token_ids
    again = llm.generate(PROMPT, sp)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.2, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(["Hello world", PROMPT, "Paged attention keeps"], [others, sp, others])
    assert alone == again == mixed[1].outputs[0].token_ids
    other_seed = llm.generate(PROMPT, sp.model_copy(update={"seed": 99}))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_completions_per_prompt(llm):
    """n > 1: n completions in one RequestOutput (index 0..n-1); seeded, completion i uses seed + i (as vLLM),
    so each equals a single request with that seed; the step API refuses n > 1 with what to do instead."""
    sp = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True, n=3)
    outs = llm.generate([PROMPT, "Hello world"], sp)
    assert len(outs) == 2 and all(o.finished and len(o.outputs) == 3 for o in outs)
    assert [c.index for c in outs[0].outputs] == [0, 1, 2]
    for i in range(3):
        single = llm.generate(PROMPT, sp.model_copy(update={"n": 1, "seed": 7 + i}))[0].outputs[0]
        assert outs[0].outputs[i].token_ids == single.token_ids and outs[0].outputs[i].text == single.text
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1  # different seeds, different samples
    greedy_n = llm.generate(PROMPT, greedy(n=2))[0]
    assert greedy_n.outputs[0].token_ids == greedy_n.outputs[1].token_ids == llm.generate(PROMPT, greedy())[0].outputs[0].token_ids
    bad = llm.generate(["", PROMPT], greedy(n=2))  # a bad prompt with n > 1: one error output, the rest run
    assert bad[0].outputs[0].finish_reason == "error" and len(bad[1].outputs) == 2
    with pytest.raises(ValueError, match="n=2"):
        llm.add_request("x", PROMPT, greedy(n=2))
    assert not llm.has_unfinished_requests() and llm.kv.num_free_blocks == llm.num_blocks


# -- abort, step API --------------------------------------------------------------------------------------


def test_abort_frees_blocks(llm):
    free0 = llm.kv.num_free_blocks
    assert free0 == llm.num_blocks
    llm.add_request("a", PROMPT, greedy(max_tokens=50))
    llm.add_request("b", "Hello world", greedy(max_tokens=50))
    for _ in range(3):
        llm.step()
    assert llm.kv.num_free_blocks < free0
    out = llm.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 3
    assert llm.abort("a") is None
    steps = 0
    while llm.has_unfinished_requests():
        for o in llm.step():
            assert o.request_id == "b"
        steps += 1
    assert steps == 47
    assert llm.kv.num_free_blocks == free0 and not llm.kv.block_tables


def test_abort_waiting_request_and_duplicate_ids(llm):
    llm.add_request("w", PROMPT, greedy())
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request("w", PROMPT, greedy())
    assert llm.abort("w").outputs[0].finish_reason == "abort"
    assert not llm.has_unfinished_requests() and llm.kv.num_free_blocks == llm.num_blocks


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"min_p": 2.0}, "min_p"), ({"top_k": -2}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"n": 0}, "n"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop": [""]}, "stop"),
    ({"logprobs": -1}, "logprobs"), ({"bogus": 1}, "bogus"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_sampling_params_are_rejected(kw, match):
    with pytest.raises(ValidationError, match=match):
        SamplingParams(**kw)


def test_bad_requests_raise_at_add_time(llm):
    long = list(range(3, 3 + llm.max_model_len))
    for prompt, match in [("", "empty"), ([], "empty"), ([1, 2, llm.vocab_size], "outside the vocabulary"),
                          ([1, -1], "outside the vocabulary"), (long, "max_model_len"), ([1.5, "x"], "token ids")]:
        with pytest.raises(ValueError, match=match):
            llm.add_request("bad", prompt, greedy())
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.add_request("bad", PROMPT, greedy(stop_token_ids=[10**6]))
    assert not llm.has_unfinished_requests()


def test_bad_prompts_in_a_batch_do_not_affect_the_others(llm):
    good = llm.generate([PROMPT, "Hello world"], greedy())
    outs = llm.generate([PROMPT, "", [1, 10**6], "Hello world", list(range(3, 3 + llm.max_model_len))], greedy())
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "error", "error", "length", "error"]
    assert "empty" in outs[1].error and "vocabulary" in outs[2].error and "max_model_len" in outs[4].error
    assert outs[0].outputs[0].token_ids == good[0].outputs[0].token_ids
    assert outs[3].outputs[0].token_ids == good[1].outputs[0].token_ids
    assert outs[0].error is None and outs[0].outputs[0].text == good[0].outputs[0].text


def test_kv_cache_too_small_for_max_model_len_is_a_clear_error(llama_dir):
    with pytest.raises(ValueError, match="raise kv_cache_memory"):
        LLM(llama_dir, max_model_len=256, kv_cache_memory=64 * 1024)
    with pytest.raises(ValueError, match="block_size"):
        LLM(llama_dir, block_size=3)


def test_max_model_len_finishes_with_length(llama_dir):
    with LLM(llama_dir, max_model_len=32, kv_cache_memory=1 << 20) as llm:
        out = llm.generate([list(range(3, 23))], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].finish_reason == "length"


def test_input_forms_and_order(llm):
    ids = llm.tokenizer.encode(PROMPT)
    a = llm.generate(PROMPT, greedy())[0]
    b = llm.generate(ids, greedy())[0]  # a single list[int]
    c = llm.generate([ids, PROMPT], greedy())
    assert a.prompt_token_ids == ids and a.prompt == PROMPT and b.prompt is None
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c[0].outputs[0].token_ids == c[1].outputs[0].token_ids


def test_shutdown(llama_dir):
    llm = LLM(llama_dir, kv_cache_memory=1 << 20)
    llm.add_request("x", PROMPT, greedy())
    llm.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPT)


def test_chat_uses_the_template(llm):
    msgs = [{"role": "user", "content": "Hello world"}]
    out = llm.chat(msgs, greedy(max_tokens=4))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("<s><|user|> Hello world\n<|assistant|> ",
                                                        add_special_tokens=False)
    assert out.outputs[0].token_ids == llm.generate([out.prompt_token_ids], greedy(max_tokens=4))[0].outputs[0].token_ids


def test_step_inputs_live_in_persistent_buffers(llm):
    """Every step's input tensors are views of the same preallocated buffers (a decode step can be
    captured as a device graph and replayed with new contents)."""
    seen = []
    real = llm.runner.execute

    def spy(input_ids, positions, attn_metadata, logits_indices=None, **kw):
        md = attn_metadata
        seen.append(tuple(t.data_ptr() for t in (input_ids, positions, md.slot_mapping, md.seq_lens,
                                                 md.query_start_loc, md.block_table, logits_indices)))
        return real(input_ids, positions, attn_metadata, logits_indices, **kw)

    llm.runner.execute = spy
    try:
        llm.generate([PROMPT, "Hello world"], greedy(max_tokens=5))
    finally:
        llm.runner.execute = real
    assert len(seen) == 5 and len(set(seen)) == 1
    buf = llm.buffers
    assert buf.dev["input_ids"].shape == (llm.max_num_batched_tokens,)
    assert buf.dev["block_table"].shape == (llm.max_num_seqs, -(-llm.max_model_len // llm.block_size))


def test_an_op_table_is_taken_for_one_rank_only(llama_dir):
    """LLM(backend=<OpTable>) runs on that table; tensor-parallel ranks bind their own by name, so a table
    there (whose overrides would not reach them) is refused before any rank starts."""
    from accel_models.backends import resolve_ops
    from accel_models.runtime.llm import LLM

    table = resolve_ops("reference", ops="paged_attention=reference")
    with LLM(llama_dir, backend=table, max_num_seqs=2, kv_cache_memory=4 << 20) as llm:
        assert llm.ops is table
    with pytest.raises(ValueError, match="takes a backend name, not an op table"):
        LLM(llama_dir, backend=table, tensor_parallel_size=2)
