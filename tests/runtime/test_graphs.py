"""Decode graphs in the runtime, on the CPU: a fake graph-capable backend registered in-process whose
"graph" replays the captured Python callable. Checks that pure decode steps replay (padded to the captured
size, with -1 slots and one-token padding sequences), that the inputs stay at the captured addresses, that
prefill and uncaptured batch sizes run eagerly, and that greedy tokens are the same with graphs on and off.
The CUDA graphs themselves are checked on the GPU by bench/cuda/bench_decode.py (graphs on vs off)."""

from __future__ import annotations

import types

import pytest
import torch

import accel_models
from accel_models import BackendInfo, hookimpl
from accel_models import backends as B
from accel_models.runtime.graphs import check_batch_sizes
from accel_models.runtime.llm import LLM
from accel_models.runtime.sampling_params import SamplingParams

NAME = "fakegraph"


class FakeGraph:
    """Replays the captured callable; records the input addresses it was captured with."""

    def __init__(self, fn, buffers_ptrs, log):
        self.fn, self.pool, self.ptrs, self.log = fn, "pool", buffers_ptrs, log

    def replay(self):
        self.log.append("replay")
        return self.fn()


def make_fake_backend(log: list, *, fail_at: int | None = None, decline: bool = False,
                      fail_greedy: type[Exception] | None = None) -> types.ModuleType:
    """``fail_at``: the n-th capture raises (plain and greedy captures alternate, largest size first);
    ``fail_greedy``: every greedy capture (the step returning ids, not logits) raises this."""
    mod = types.ModuleType("fake_graph_backend")

    def backend_info():
        return BackendInfo(name=NAME, device_type="cpu", available=True, reason=None, priority=-200)

    def capture_graph(fn, device, pool):
        if decline:
            return None
        out = fn()  # a real backend runs fn while capturing
        kind = "logits" if out.ndim == 2 else "greedy"
        assert out.ndim == 2 or (out.ndim == 1 and out.dtype == torch.int64)
        log.append(("capture", pool, kind, out.shape[0]))
        if fail_at is not None and sum(1 for e in log if isinstance(e, tuple)) == fail_at:
            raise RuntimeError("operation not permitted when stream is capturing")
        if fail_greedy is not None and kind == "greedy":
            raise fail_greedy("argmax not capturable here")
        return FakeGraph(fn, None, log)

    mod.accel_backend_info = hookimpl(backend_info)
    mod.accel_capture_graph = hookimpl(capture_graph)
    return mod


@pytest.fixture
def fake(monkeypatch):
    log: list = []

    def register(**kw):
        B.register_backend(make_fake_backend(log, **kw), NAME)
        return log

    yield register
    B.unregister_backend(NAME)


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11], [20], [30, 31, 32]]


def test_graphs_replay_padded_decode_and_match_eager(fake, llama_dir):
    log = fake()
    with LLM(llama_dir, backend="reference", max_num_seqs=8, kv_cache_memory=4 << 20, enforce_eager=True) as eager:
        want = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, greedy(4))]
        assert eager.graphs is None
    with LLM(llama_dir, backend=NAME, max_num_seqs=8, kv_cache_memory=4 << 20,
             graph_batch_sizes=[1, 2, 4]) as llm:
        g = llm.graphs
        assert g is not None and sorted(g.graphs) == [1, 2, 4] and sorted(g.greedy_graphs) == [1, 2, 4]
        # captured largest first, each size's plain graph then its greedy one; later captures share the
        # first one's pool
        caps = [e[1:] for e in log if isinstance(e, tuple)]
        assert caps == [(None, "logits", 4), ("pool", "greedy", 4), ("pool", "logits", 2), ("pool", "greedy", 2),
                        ("pool", "logits", 1), ("pool", "greedy", 1)]
        ptrs = {k: v.data_ptr() for k, v in llm.buffers.dev.items()}
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(4))]
        assert got == want
        # 5 sequences decode 3 steps: more than the largest captured size (4): eager
        assert g.replays == 0 and g.eager_decode_steps == 3
        assert {k: v.data_ptr() for k, v in llm.buffers.dev.items()} == ptrs  # the same addresses

        # 3 sequences: padded to 4; 1 sequence: graph of 1
        got3 = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], greedy(4))]
        assert got3 == want[:3]
        assert g.replays == 3 and g.greedy_replays == 3  # greedy steps: the argmax ran in the graph
        h = llm.buffers.host
        # (the padding row's input id is whatever the greedy graph's argmax wrote there: unread)
        assert h["slot_mapping"][3] == -1 and h["seq_lens"][3] == 1
        assert list(h["query_start_loc"][:5]) == [0, 1, 2, 3, 4]
        got1 = llm.generate([PROMPTS[1]], greedy(3))[0].outputs[0].token_ids
        assert got1 == want[1][:3]
        assert g.replays == 5 and g.eager_decode_steps == 3
        assert log.count("replay") == 5


def _eager_tokens(llama_dir, prompts, params):
    with LLM(llama_dir, backend="reference", max_num_seqs=8, kv_cache_memory=4 << 20, enforce_eager=True) as eager:
        return [o.outputs[0].token_ids for o in eager.generate(prompts, params)]


def _async_graph_llm(llama_dir, kv_cache_memory: int = 4 << 20) -> LLM:
    """The fake graph backend with async scheduling, graphs of 1, 2, 4 and 8 sequences."""
    return LLM(llama_dir, backend=NAME, max_num_seqs=8, kv_cache_memory=kv_cache_memory,
               graph_batch_sizes=[1, 2, 4, 8], async_scheduling=True)


def test_greedy_graph_ids_feed_the_next_overlapped_step(fake, llama_dir):
    """With async scheduling the next step is launched before this one's ids reach the host: its input ids
    are the ones the greedy graph wrote into the input-ids buffer (no copy, the host-to-device copy skips
    them). Requests stop at different steps (stop tokens), so overlapped rows are dropped mid-way."""
    want = _eager_tokens(llama_dir, PROMPTS, greedy(8))
    stops = [SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[w[2 + i % 3]], ignore_eos=True)
             for i, w in enumerate(want)]
    want_stop = [w[: w.index(w[2 + i % 3]) + 1] for i, w in enumerate(want)]
    fake()
    with _async_graph_llm(llama_dir) as llm:
        g = llm.graphs
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(8))]
        assert got == want
        assert llm.overlapped_steps >= 5 and g.greedy_replays >= 6
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, stops)]
        assert got == want_stop
        assert llm.kv.num_free_blocks == llm.num_blocks
        # turned off (what the benchmark compares): the plain graphs, argmax after them, the same tokens
        g.sample_in_graph = False
        before = g.greedy_replays
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(8))]
        assert got == want and g.greedy_replays == before


def test_greedy_graphs_through_preemption_and_an_abort_in_flight(fake, llama_dir):
    """A KV cache too small for the batch (requests preempted and recomputed, so rows and padded sizes
    change between overlapped steps) and an abort while the next step, with the aborted row, is already
    launched: tokens equal the eager engine's, every block comes back."""
    want = _eager_tokens(llama_dir, PROMPTS, greedy(20))
    fake()
    with _async_graph_llm(llama_dir, kv_cache_memory=32 << 10) as llm:
        g = llm.graphs
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(20))]
        assert got == want
        assert llm.scheduler.num_preemptions > 0 and g.greedy_replays > 0 and llm.overlapped_steps > 0
        assert llm.kv.num_free_blocks == llm.num_blocks
    with _async_graph_llm(llama_dir) as llm:
        for i in range(3):
            llm.add_request(f"r{i}", PROMPTS[i], greedy(16))
        tokens: dict[str, list[int]] = {}
        aborted_at = None
        while llm.has_unfinished_requests():
            for o in llm.step():
                tokens[o.request_id] = o.outputs[0].token_ids
            if aborted_at is None and len(tokens.get("r1", [])) == 5:
                assert llm._inflight is not None and llm._inflight.ids_on_device  # r1's row is on its way
                aborted_at = list(tokens["r1"])
                llm.abort("r1")
        assert tokens["r1"] == aborted_at and tokens["r0"] == want[0][:16] and tokens["r2"] == want[2][:16]
        assert llm.graphs.greedy_replays > 10 and llm.kv.num_free_blocks == llm.num_blocks


def test_steps_needing_logits_replay_the_plain_graph(fake, llama_dir):
    """logprobs, a temperature, or min_tokens still masking: the graph that returns logits, sampled after."""
    fake()
    with LLM(llama_dir, backend=NAME, max_num_seqs=4, kv_cache_memory=4 << 20, graph_batch_sizes=[2],
             async_scheduling=True) as llm:
        g = llm.graphs
        outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, ignore_eos=True))
        assert all(len(o.outputs[0].logprobs) == 4 for o in outs)
        assert g.replays == 3 and g.greedy_replays == 0
        llm.generate(PROMPTS[:2], SamplingParams(temperature=0.8, seed=3, max_tokens=4, ignore_eos=True))
        assert g.replays == 6 and g.greedy_replays == 0
        # min_tokens: masked (plain graph) until 3 tokens exist, then greedy in the graph
        want = _eager_tokens(llama_dir, PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3))
        got = [o.outputs[0].token_ids
               for o in llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3))]
        assert got == want
        assert g.greedy_replays > 0


@pytest.mark.parametrize("error", [RuntimeError, ValueError])  # a failed capture; an argmax declining the logits
def test_a_failing_greedy_capture_keeps_the_plain_graphs(fake, llama_dir, caplog, error):
    want = _eager_tokens(llama_dir, PROMPTS[:3], greedy(4))
    fake(fail_greedy=error)
    with LLM(llama_dir, backend=NAME, max_num_seqs=4, kv_cache_memory=4 << 20, graph_batch_sizes=[1, 4],
             async_scheduling=True) as llm:
        g = llm.graphs
        assert sorted(g.graphs) == [1, 4] and g.greedy_graphs == {}
        assert "greedy decode graph of batch 4 not captured" in caplog.text
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], greedy(4))]
        assert got == want and g.replays == 3 and g.greedy_replays == 0


def test_sampling_with_prompt_logprobs_and_mixed_steps_run_eagerly(fake, llama_dir):
    fake()
    with LLM(llama_dir, backend=NAME, max_num_seqs=4, kv_cache_memory=4 << 20, graph_batch_sizes=[2]) as llm:
        # prompt logprobs: the prefill is eager; decode steps of 2 sequences replay
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=1)
        outs = llm.generate(PROMPTS[:2], params)
        assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
        assert llm.graphs.replays == 2
        # a new request arriving while another decodes: the mixed step (prefill + decode) is eager
        llm.add_request("a", PROMPTS[0], greedy(4))
        llm.step()
        llm.add_request("b", PROMPTS[2], greedy(2))
        before = llm.graphs.replays
        llm.step()  # prefill of b + decode of a
        assert llm.graphs.replays == before
        while llm.has_unfinished_requests():
            llm.step()
        assert llm.graphs.replays > before


def test_backend_without_graphs_or_failing_capture_runs_eagerly(fake, llama_dir, caplog):
    log = fake(fail_at=3)  # size 4's plain and greedy graphs, then size 1's plain one fails
    with LLM(llama_dir, backend=NAME, max_num_seqs=4, kv_cache_memory=4 << 20, graph_batch_sizes=[1, 4]) as llm:
        assert llm.graphs is None  # the capture of size 1 failed: no graphs at all, a warning says why
        assert "capture of decode batch 1 failed" in caplog.text
        assert llm.generate([PROMPTS[0]], greedy(3))[0].outputs[0].token_ids
    assert "replay" not in log
    with LLM(llama_dir, backend="reference", max_num_seqs=4, kv_cache_memory=4 << 20) as llm:
        assert llm.graphs is None  # the reference's capture_graph returns None


def test_graph_batch_sizes_are_checked():
    assert check_batch_sizes(None, 64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert check_batch_sizes(None, 10) == (1, 2, 4, 8, 10)
    assert check_batch_sizes([4, 1, 4], 8) == (1, 4)
    with pytest.raises(ValueError, match="exceeds max_num_seqs"):
        check_batch_sizes([16], 8)
    with pytest.raises(ValueError, match="positive ints"):
        check_batch_sizes([0], 8)


def test_reference_capture_graph_declines():
    ops = accel_models.resolve_ops("reference")
    assert ops.capture_graph(fn=lambda: torch.zeros(1), device=torch.device("cpu"), pool=None) is None
