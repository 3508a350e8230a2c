"""Tensor and expert parallelism over real processes: 2 ranks, gloo on CPU, float32.

One launched group serves every checkpoint (each test swaps the ranks' model), to keep process start-up
(importing torch in two fresh processes) out of most tests. Checks, per model:

* rank 0's logits equal the single-process zoo run (tight: 1e-5 relative) and transformers' (fp32
  tolerance: the independent reference), and greedy tokens equal both;
* each rank holds exactly its shard: parameter shapes from the sharding rules computed here from the
  config, and the contents of a few shards read straight from the safetensors file;
* loading reads only the shard (elements read from the file == elements the rank keeps).

Then the launcher itself: a failing rank fails the call with its error and leaves no process and no
listening port; a rank that dies is reported; a second launch works right after; and
``accel_models.LLM(tensor_parallel_size=2)`` generates what the single-process LLM does.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers builds the checkpoints and the reference")
import torch.distributed as dist  # noqa: E402

if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available in this torch build", allow_module_level=True)

import tp_rank_helpers  # noqa: E402
from safetensors import safe_open  # noqa: E402

from accel_models import load_model  # noqa: E402
from accel_models.context import ParallelGroup  # noqa: E402
from accel_models.distributed import DistributedExecutor, RankError, TPModelRunner  # noqa: E402
from accel_models.runner import ModelRunner  # noqa: E402

TP = 2
# vocab 125: odd, so the vocabulary pads to 126 and rank 1 holds one padding row.
BASE = dict(vocab_size=125, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=64, intermediate_size=48, tie_word_embeddings=False)
CONFIGS = {
    "llama": ("LlamaConfig", {}),
    # one KV head for 2 ranks: replicated; Qwen2 adds qkv biases; tied embeddings share the vocab shard
    "qwen2-kv1-tied": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # 5 experts: expert parallelism splits them 3 + 2
    "mixtral-5x2": ("MixtralConfig", dict(num_local_experts=5, num_experts_per_tok=2)),
}
CASES = [("llama", False), ("qwen2-kv1-tied", False), ("mixtral-5x2", False), ("mixtral-5x2", True)]
SEQUENCES = [[3, 17, 42, 5, 99, 124, 0, 64, 8, 31], [9, 8, 7, 6, 5], [100]]
GREEDY_PROMPTS = [[3, 17, 42, 5], [9, 8, 7, 6, 5, 4]]
GREEDY_TOKENS = 6


# ----------------------------------------------------------------------------------------------------
# Checkpoints and the single-process references
# ----------------------------------------------------------------------------------------------------


def _build(name: str, root: Path) -> dict[str, Any]:
    cls_name, overrides = CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**BASE, **overrides})
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in pname else p.normal_(0.0, 0.15)
    path = root / name
    model.save_pretrained(path)
    with torch.no_grad():
        hf_logits = [model(torch.tensor([s])).logits[0] for s in SEQUENCES]
        hf_greedy = []
        for prompt in GREEDY_PROMPTS:
            seq = list(prompt)
            for _ in range(GREEDY_TOKENS):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            hf_greedy.append(seq[len(prompt):])
    single = ModelRunner(load_model(path, backend="reference", dtype="float32"))
    return dict(path=str(path), config=config, hf_logits=hf_logits, hf_greedy=hf_greedy,
                single_logits=single.forward_sequences(SEQUENCES), single_greedy=greedy(single))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("tp_ckpts")
    return {name: _build(name, root) for name in CONFIGS}


@pytest.fixture(scope="module")
def tp(ckpts: dict[str, dict[str, Any]]) -> Any:
    """One 2-rank group for the model tests (each test loads its checkpoint into it)."""
    with TPModelRunner(ckpts["llama"]["path"], TP, backend="reference", dtype="float32", runner_kwargs={}) as r:
        yield r


def greedy(runner: Any) -> list[list[int]]:
    """Greedy continuations of GREEDY_PROMPTS, decoded together step by step through ``runner.step``."""
    out = runner.step({i: p for i, p in enumerate(GREEDY_PROMPTS)})
    tokens: list[list[int]] = [[] for _ in GREEDY_PROMPTS]
    for _ in range(GREEDY_TOKENS):
        nxt = {i: int(out[i][-1].argmax()) for i in out}
        for i, t in nxt.items():
            tokens[i].append(t)
        out = runner.step({i: [t] for i, t in nxt.items()})
    for i in range(len(GREEDY_PROMPTS)):
        runner.free(i)
    return tokens


def expected_shard_shapes(cfg: Any, rank: int, tp: int, ep: bool) -> dict[str, tuple[int, ...]]:
    """Every parameter's per-rank shape, from the sharding rules (vLLM's) applied to the HF config."""
    hid, n_heads, n_kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inter, vocab = cfg.intermediate_size, cfg.vocab_size
    kv_local = max(1, n_kv // tp)  # fewer KV heads than ranks: one (replicated) head per rank
    vocab_local = -(-vocab // tp)  # padded to a multiple of tp
    qkv_rows = (n_heads // tp + 2 * kv_local) * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_local, hid), "model.norm.weight": (hid,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_local, hid)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.qkv_proj.weight"] = (qkv_rows, hid)
        if cfg.model_type == "qwen2":
            shapes[f"{p}.self_attn.qkv_proj.bias"] = (qkv_rows,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (hid, n_heads * d // tp)
        shapes[f"{p}.input_layernorm.weight"] = (hid,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hid,)
        if cfg.model_type == "mixtral":
            n_exp = cfg.num_local_experts
            moe = f"{p}.block_sparse_moe"
            shapes[f"{moe}.gate.weight"] = (n_exp, hid)
            if ep:
                local = n_exp // tp + (1 if rank < n_exp % tp else 0)
                shapes[f"{moe}.experts.w13_weight"] = (local, 2 * inter, hid)
                shapes[f"{moe}.experts.w2_weight"] = (local, hid, inter)
            else:
                shapes[f"{moe}.experts.w13_weight"] = (n_exp, 2 * inter // tp, hid)
                shapes[f"{moe}.experts.w2_weight"] = (n_exp, hid, inter // tp)
        else:
            shapes[f"{p}.mlp.gate_up_proj.weight"] = (2 * inter // tp, hid)
            shapes[f"{p}.mlp.down_proj.weight"] = (hid, inter // tp)
    return shapes


def _file_tensor(path: str, name: str) -> torch.Tensor:
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name).float()


# ----------------------------------------------------------------------------------------------------
# Models over 2 ranks
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "ep"), CASES, ids=[f"{n}-{'ep' if e else 'tp'}" for n, e in CASES])
def test_tp_matches_single_process_and_holds_only_its_shard(tp: Any, ckpts: dict[str, Any], name: str,
                                                            ep: bool) -> None:
    ck = ckpts[name]
    tp.executor.call(tp_rank_helpers.load_on_rank, ck["path"], ep)

    # logits: rank 0's == single process (tight) and == transformers (fp32 tolerance)
    logits = tp.forward_sequences(SEQUENCES)
    for got, single, hf in zip(logits, ck["single_logits"], ck["hf_logits"]):
        assert got.shape == (len(single), BASE["vocab_size"])
        scale = float(single.abs().max())
        torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(got, hf, rtol=1e-4, atol=1e-4 * scale)
    # greedy decoding through the paged cache (prefill then single-token steps)
    tokens = greedy(tp)
    assert tokens == ck["single_greedy"] == ck["hf_greedy"]

    # each rank holds exactly its shard
    infos = tp.model_info(all_ranks=True)
    cfg = ck["config"]
    for rank, info in enumerate(infos):
        assert info["rank"] == rank
        assert info["param_shapes"] == expected_shard_shapes(cfg, rank, TP, ep)
    full = expected_shard_shapes(cfg, 0, 1, False)
    full_numel = sum(torch.Size(s).numel() for s in full.values())
    assert all(info["param_numel"] < 0.75 * full_numel for info in infos), (
        [i["param_numel"] for i in infos], full_numel)
    # attention heads per rank: half the query heads; KV heads split, or replicated when too few
    for _, kv_heads, head_size in infos[1]["attention"]:
        assert (kv_heads, head_size) == (max(1, cfg.num_key_value_heads // TP), cfg.head_dim)

    # contents of a few shards, against the checkpoint file
    path, d = ck["path"], cfg.head_dim
    q_rows = cfg.num_attention_heads // TP * d
    kv_local = max(1, cfg.num_key_value_heads // TP)
    k_full = _file_tensor(path, "model.layers.0.self_attn.k_proj.weight")
    embed_full = _file_tensor(path, "model.embed_tokens.weight")
    for rank in range(TP):
        qkv = tp.executor.call_all(tp_rank_helpers.get_param, "model.layers.0.self_attn.qkv_proj.weight")[rank]
        kv_head = rank // max(1, TP // cfg.num_key_value_heads)  # the KV head this rank's query heads use
        torch.testing.assert_close(qkv[q_rows : q_rows + kv_local * d],
                                   k_full[kv_head * kv_local * d : (kv_head + 1) * kv_local * d], rtol=0, atol=0)
    embeds = tp.executor.call_all(tp_rank_helpers.get_param, "model.embed_tokens.weight")
    torch.testing.assert_close(torch.cat(embeds)[: cfg.vocab_size], embed_full, rtol=0, atol=0)
    assert not embeds[1][-1].any()  # the padding row
    if name.startswith("mixtral"):
        w13 = tp.executor.call_all(tp_rank_helpers.get_param, "model.layers.1.block_sparse_moe.experts.w13_weight")
        moe = "model.layers.1.block_sparse_moe.experts"
        inter = cfg.intermediate_size
        if ep:  # rank 1 holds experts 3 and 4, whole
            w1, w3 = _file_tensor(path, f"{moe}.4.w1.weight"), _file_tensor(path, f"{moe}.4.w3.weight")
            torch.testing.assert_close(w13[1][1], torch.cat((w1, w3)), rtol=0, atol=0)
        else:  # rank 1 holds the second half of every expert's intermediate dim
            w1, w3 = _file_tensor(path, f"{moe}.2.w1.weight"), _file_tensor(path, f"{moe}.2.w3.weight")
            half = inter // TP
            torch.testing.assert_close(w13[1][2], torch.cat((w1[half:], w3[half:])), rtol=0, atol=0)


class _Rank(ParallelGroup):
    """Rank ``rank`` of a group, for loading only (no forward pass, so no collective is needed)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


@pytest.mark.parametrize(("name", "ep"), [("llama", False), ("mixtral-5x2", True)])
def test_a_rank_reads_only_its_shard_from_the_file(ckpts: dict[str, Any], name: str, ep: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every element read from the safetensors file lands in the rank's parameters."""
    from accel_models import loader

    read = [0]
    getitem, materialize = loader.LazyTensor.__getitem__, loader.LazyTensor.materialize

    def counting_getitem(self: Any, index: Any) -> torch.Tensor:
        out = getitem(self, index)
        read[0] += out.numel()
        return out

    def counting_materialize(self: Any) -> torch.Tensor:
        out = materialize(self)
        read[0] += out.numel()
        return out

    monkeypatch.setattr(loader.LazyTensor, "__getitem__", counting_getitem)
    monkeypatch.setattr(loader.LazyTensor, "materialize", counting_materialize)
    cfg = ckpts[name]["config"]
    model = load_model(ckpts[name]["path"], backend="reference", dtype="float32", tp_group=_Rank(1, TP),
                       ep_enabled=ep)
    kept = sum(p.numel() for p in model.parameters())
    padding_rows = -(-cfg.vocab_size // TP) * TP - cfg.vocab_size  # rank 1's padding rows: zeros, not read
    heads = 1 if cfg.tie_word_embeddings else 2
    assert read[0] == kept - padding_rows * cfg.hidden_size * heads
    full = sum(torch.Size(s).numel() for s in expected_shard_shapes(cfg, 0, 1, False).values())
    assert read[0] < 0.75 * full


# ----------------------------------------------------------------------------------------------------
# The launcher: failures, shutdown, relaunch
# ----------------------------------------------------------------------------------------------------


def _assert_gone(pids: list[int], port: int) -> None:
    ours = {p.pid for p in multiprocessing.active_children()}
    assert not ours & set(pids), f"ranks still alive: {ours & set(pids)}"
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # reaped too: not even a zombie
            os.kill(pid, 0)
    with socket.socket() as s:  # nothing listens on the rendezvous port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_a_failing_rank_fails_the_call_with_its_error_and_leaves_nothing_behind() -> None:
    ex = DistributedExecutor(TP, tp_rank_helpers.EchoWorker, backend="reference")
    pids, port = ex.pids, ex.port
    assert len(set(pids)) == TP and ex.call_all("pid") == pids
    assert ex.call("rank_sum") == 3.0  # a real collective: 1 + 2
    # rank 1 raises while rank 0 waits for it in an all-reduce
    with pytest.raises(RankError, match="rank 1 failed.*ValueError: injected failure on rank 1") as info:
        ex.call(tp_rank_helpers.fail_on_rank, 1, "injected failure on rank 1")
    assert info.value.rank == 1 and info.value.exc_type == "builtins.ValueError"
    assert "fail_on_rank" in info.value.remote_traceback  # the rank's own traceback
    assert isinstance(info.value.__cause__, ValueError)
    assert ex.closed
    _assert_gone(pids, port)
    with pytest.raises(RuntimeError, match="shut down after rank 1 failed"):
        ex.call("rank_sum")

    # a second launch right after works; a rank that dies without a word is reported too
    with DistributedExecutor(TP, tp_rank_helpers.EchoWorker, backend="reference") as ex2:
        assert ex2.call("rank_sum") == 3.0
        with pytest.raises(RankError, match="rank 0 died.*exit code 3"):
            ex2.call(tp_rank_helpers.exit_on_rank, 0)
    _assert_gone(ex2.pids, ex2.port)


def test_a_rank_that_fails_at_startup_fails_the_launch(ckpts: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((Path(ckpts["llama"]["path"]) / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(RankError, match="rank [01] failed in startup") as info:
        TPModelRunner(tmp_path, TP, backend="reference")
    assert info.value.exc_type == "accel_models.errors.CheckpointError"
    assert "not a readable safetensors file" in str(info.value)
    assert {p.pid for p in multiprocessing.active_children()} <= before


def test_llm_with_tensor_parallel_size_generates_what_one_process_does(ckpts: dict[str, Any]) -> None:
    from accel_models import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    path = ckpts["mixtral-5x2"]["path"]
    kw = dict(backend="reference", dtype="float32", kv_cache_memory=4 << 20, max_model_len=32)
    with LLM(path, **kw) as llm:
        one = [o.outputs[0].token_ids for o in llm.generate(GREEDY_PROMPTS, params)]
    with LLM(path, tensor_parallel_size=TP, enable_expert_parallel=True, **kw) as llm:
        pids, port = llm.runner.executor.pids, llm.runner.executor.port
        two = [o.outputs[0].token_ids for o in llm.generate(GREEDY_PROMPTS, params)]
        assert llm.score([SEQUENCES[0]])[0].shape == (len(SEQUENCES[0]), BASE["vocab_size"])
    assert two == one == ckpts["mixtral-5x2"]["hf_greedy"]
    _assert_gone(pids, port)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(GREEDY_PROMPTS, params)
