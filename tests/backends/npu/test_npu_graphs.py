"""ACL graphs on the NPU backend (its capture_graph hook), over the EMULATION of torch_npu's graph API (CPU).

What the emulation keeps of a real capture (``accel_backend_npu/emulation_graph.py``): a replay redoes the
captured work on the current contents of the captured tensors with every host value frozen as captured,
host reads inside a capture fail, and ``NPUGraph.update`` rewrites the recorded attention calls' lengths
as torch_npu's IFA handler does. So these tests show that the backend's graphs give the eager tokens only
because it updates the lengths (a graph replayed without the update gives other tokens), and every call
into the graph API is checked against the real torch-npu wheel's Python source.
"""

from __future__ import annotations

import ast
import zipfile

import pytest
import torch

import accel_backend_npu
import accel_models
import npu_wheel_schema as wheel
from accel_backend_npu import _graphs, emulation_graph, use_torch_npu
from accel_backend_npu.emulation import TorchNpuEmulation
from accel_models.runtime.demo import llama_config, mixtral_config, write_checkpoint
from accel_models.runtime.graphs import DecodeGraphs
from accel_models.runtime.llm import LLM
from accel_models.runtime.sampling_params import SamplingParams

VOCAB = 384


@pytest.fixture
def npu_llm_backend():
    """The torch_npu emulation injected; LLMs get the NPU op table bound with allow_unavailable (the backend
    reports itself unusable without a real NPU)."""
    with use_torch_npu(TorchNpuEmulation()) as emu:
        yield emu


def npu_table() -> accel_models.OpTable:
    return accel_models.resolve_ops("npu", allow_unavailable=True)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    # head size 32: npu_mrope takes rotary dims that are multiples of 32 (16 would run the reference rotary)
    kw = dict(hidden_size=128, num_heads=4, num_kv_heads=2, max_position_embeddings=512, torch_dtype="bfloat16")
    return {"llama": write_checkpoint(tmp_path_factory.mktemp("npu_llama"), llama_config(VOCAB, **kw)),
            "mixtral": write_checkpoint(tmp_path_factory.mktemp("npu_mixtral"), mixtral_config(VOCAB, **kw))}


# prompt lengths around the 128-token block: decode steps cross block boundaries, lengths differ per row
PROMPTS = [list(range(3, 3 + n)) for n in (120, 5, 126, 40)]


def generate(model_dir, prompts, *, eager: bool, max_tokens: int = 12, **kw):
    with LLM(model_dir, backend=npu_table(), device="cpu", dtype=torch.bfloat16, max_num_seqs=4, kv_cache_memory=8 << 20,
             enforce_eager=eager, graph_batch_sizes=None if eager else [1, 2, 4], **kw) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        return out, llm.graphs


@pytest.mark.parametrize("model", ["llama", "mixtral"])
def test_graphs_give_the_eager_tokens(npu_llm_backend, model_dirs, model):
    eager, none = generate(model_dirs[model], PROMPTS, eager=True)
    assert none is None
    graphed, graphs = generate(model_dirs[model], PROMPTS, eager=False)
    assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4] and sorted(graphs.greedy_graphs) == [1, 2, 4]
    assert graphs.greedy_replays > 10, (graphs.replays, graphs.eager_decode_steps)
    assert graphed == eager
    # one captured attention call per layer, all reading the same length tensors
    g = graphs.greedy_graphs[4]
    assert len(g.attention) == 2 and len({(id(a), id(b)) for a, b in g.attention}) == 1


def test_graphs_with_overlapped_steps_give_the_eager_tokens(npu_llm_backend, model_dirs):
    """Async scheduling: a greedy graph leaves the next step's ids in place and the host fills the next step
    while the last one is in flight; the lengths each replay updates must be that step's."""
    eager, _ = generate(model_dirs["llama"], PROMPTS, eager=True)
    with LLM(model_dirs["llama"], backend=npu_table(), device="cpu", dtype=torch.bfloat16, max_num_seqs=4,
             kv_cache_memory=8 << 20, graph_batch_sizes=[1, 2, 4], async_scheduling=True) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        graphed = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        assert llm.graphs.greedy_replays > 10 and llm.overlapped_steps >= 10, (llm.graphs.greedy_replays,
                                                                                llm.overlapped_steps)
    assert graphed == eager


def test_without_the_length_update_a_replay_is_stale(npu_llm_backend, model_dirs, monkeypatch):
    """The emulated capture freezes the attention's host lengths: replaying without update() gives other
    tokens, so the test above passes because of the update and not by accident."""
    eager, _ = generate(model_dirs["llama"], PROMPTS[:2], eager=True)
    monkeypatch.setattr(_graphs.NpuGraph, "replay", lambda self: (self.graph.replay(), self.outputs)[1])
    stale, graphs = generate(model_dirs["llama"], PROMPTS[:2], eager=False)
    assert graphs is not None and graphs.greedy_replays > 0
    assert stale != eager


def test_replay_outside_a_forward_context_reads_the_lengths_from_the_device(npu_llm_backend, model_dirs,
                                                                              monkeypatch):
    eager, _ = generate(model_dirs["llama"], PROMPTS, eager=True)
    monkeypatch.setattr(DecodeGraphs, "_replay", lambda self, graph, size: graph.replay())  # no forward context
    graphed, graphs = generate(model_dirs["llama"], PROMPTS, eager=False)
    assert graphs.greedy_replays > 10 and graphed == eager


def test_a_step_that_reads_the_device_on_the_host_is_not_captured(npu_llm_backend, model_dirs, caplog):
    """Float32 attention has no fused kernel: the reference runs it and checks seq_lens on the host, which a
    capture does not allow. The runtime then runs every step eagerly, with the same tokens."""
    fp32 = {}
    with LLM(model_dirs["llama"], backend=npu_table(), device="cpu", dtype=torch.float32, max_num_seqs=2, kv_cache_memory=8 << 20,
             graph_batch_sizes=[2]) as llm:
        assert llm.graphs is None
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        fp32["graphs"] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params)]
    assert "ACL graph capture failed" in caplog.text and "reads device data on the host" in caplog.text
    with LLM(model_dirs["llama"], backend=npu_table(), device="cpu", dtype=torch.float32, max_num_seqs=2, kv_cache_memory=8 << 20,
             enforce_eager=True) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params)] == fp32["graphs"]


def attention_args(ops) -> dict:
    """paged_attention's arguments for two decode rows (5 and 9 cached keys) over a random bfloat16 cache."""
    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    kv = ops.allocate_kv_cache(num_blocks=2, block_size=128, num_kv_heads=1, head_size=16, dtype=bf16,
                               device=torch.device("cpu"))
    kv.copy_(torch.randn(kv.shape, generator=g))
    return dict(query=torch.randn((2, 2, 16), generator=g).to(bf16), kv_cache=kv,
                block_table=torch.tensor([[0], [1]], dtype=torch.int32), seq_lens=torch.tensor([5, 9], dtype=torch.int32),
                query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32), max_query_len=1, max_seq_len=128,
                scale=0.25, sliding_window=None, logits_soft_cap=None)


def test_attention_in_a_capture_without_host_lengths_is_refused():
    """Outside the runtime (no host copies in the metadata), a capture cannot read the lengths back."""
    with use_torch_npu(TorchNpuEmulation(record_globally=False)):
        ops = accel_models.resolve_ops(backend="npu", allow_unavailable=True)
        args = attention_args(ops)
        eager = ops.paged_attention(**args)  # outside a capture: copied back once
        with pytest.raises(RuntimeError, match="no host copy of seq_lens"):
            ops.capture_graph(fn=lambda: ops.paged_attention(**args), device=torch.device("cpu"), pool=None)
        assert _graphs._capture is None
        assert torch.equal(ops.paged_attention(**args), eager)


def test_emulated_capture_freezes_host_values_and_update_rewrites_the_lengths():
    """The emulation itself: a captured attention call replays with its captured lengths until update()."""
    g = torch.Generator().manual_seed(1)
    emu = TorchNpuEmulation(record_globally=False)
    bf16 = torch.bfloat16
    q = torch.randn((2, 2, 16), generator=g).to(bf16)
    k = torch.randn((2, 128, 16), generator=g).to(bf16)
    v = torch.randn((2, 128, 16), generator=g).to(bf16)
    table = torch.tensor([[0], [1]], dtype=torch.int32)

    def attend(kv_lens):
        return emu.npu_fused_infer_attention_score(q, k, v, block_table=table, actual_seq_lengths=[1, 2],
                                                   actual_seq_lengths_kv=kv_lens, num_heads=2, scale=0.25,
                                                   input_layout="TND", num_key_value_heads=1, block_size=128)[0]

    for auto in (True, False):
        graph = emu.npu.NPUGraph()
        with emu.npu.graph(graph, auto_dispatch_capture=auto):
            out = attend([5, 9]) * 2
        q.mul_(0.5)  # new contents are read at replay...
        graph.replay()
        assert torch.equal(out, attend([5, 9]) * 2)  # ...the captured lengths stay
        if not auto:
            with pytest.raises(RuntimeError, match="does not support update"):
                graph.update(cpu_update_input=[{"actual_seq_lengths_kv": [7, 100]}])
            continue
        graph.update(cpu_update_input=[{"actual_seq_lengths_kv": [7, 100]}])
        graph.replay()
        assert torch.equal(out, attend([7, 100]) * 2) and not torch.equal(out, attend([5, 9]) * 2)
        with pytest.raises(RuntimeError, match="1 operators"):
            graph.update(cpu_update_input=[{}, {}])

    for host_read in (lambda: int(q.sum()), lambda: q.tolist()):
        graph = emu.npu.NPUGraph()
        with pytest.raises(emulation_graph.GraphCaptureError, match="reads device data on the host"):
            with emu.npu.graph(graph):
                host_read()
    assert isinstance(q.tolist(), list)  # restored after the capture


# ----------------------------------------------------------------------------------------------------
# the graph API calls, against the real wheel's Python source
# ----------------------------------------------------------------------------------------------------

GRAPHS_PY = "torch_npu/npu/graphs.py"
UTILS_PY = "torch_npu/npu/utils.py"
STREAMS_PY = "torch_npu/npu/streams.py"
NPU_INIT_PY = "torch_npu/npu/__init__.py"
IFA_HANDLER_PY = "torch_npu/npu/_npugraph_handlers/ifa_handler.py"
#: API name in the log -> (file, class or None, function): the Python definition the call binds to
DEFINITIONS = {
    "npu.Stream": (STREAMS_PY, "Stream", "__new__"),
    "Stream.wait_stream": (STREAMS_PY, "Stream", "wait_stream"),
    "npu.current_stream": (UTILS_PY, None, "current_stream"),
    "npu.stream": (UTILS_PY, None, "stream"),
    "npu.synchronize": (UTILS_PY, None, "synchronize"),
    "npu.graph_pool_handle": (GRAPHS_PY, None, "graph_pool_handle"),
    "npu.NPUGraph": (GRAPHS_PY, "NPUGraph", "__init__"),
    "npu.graph": (GRAPHS_PY, "graph", "__init__"),
    "NPUGraph.update": (GRAPHS_PY, "NPUGraph", "update"),
    "NPUGraph.replay": (GRAPHS_PY, "NPUGraph", "replay"),
    "NPUGraph.pool": (GRAPHS_PY, "NPUGraph", "pool"),
}


@pytest.fixture(scope="module")
def wheel_zip():
    path, why = wheel.fetch_wheel()
    if path is None:
        pytest.skip(f"cannot download torch-npu=={wheel.TORCH_NPU_VERSION} from PyPI ({why})")
    with zipfile.ZipFile(path) as zf:
        yield {name: ast.parse(zf.read(name).decode()) for name in
               (GRAPHS_PY, UTILS_PY, STREAMS_PY, NPU_INIT_PY, IFA_HANDLER_PY)}


def _definition(tree: ast.Module, cls: str | None, fn: str) -> ast.FunctionDef | None:
    scope = tree.body
    if cls is not None:
        found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
        if not found:
            return None
        scope = found[0].body
    return next((n for n in scope if isinstance(n, ast.FunctionDef) and n.name == fn), None)


def check_api_call(trees, name: str, n_positional: int, keywords: tuple[str, ...]) -> list[str]:
    if name not in DEFINITIONS:
        return [f"{name}: not a torch_npu.npu API this check knows"]
    path, cls, fn = DEFINITIONS[name]
    node = _definition(trees[path], cls, fn)
    if node is None:
        return [f"{name}: {path} defines no {cls + '.' if cls else ''}{fn}"]
    a = node.args
    params = [p.arg for p in a.posonlyargs + a.args]
    if cls is not None:
        params = params[1:]  # self / cls
    names = set(params) | {p.arg for p in a.kwonlyargs}
    errors = []
    if n_positional > len(params) and a.vararg is None:
        errors.append(f"{name}: {n_positional} positional arguments, the wheel's {fn} takes {len(params)}")
    if a.kwarg is None:
        errors += [f"{name}: no parameter {k!r} in the wheel's {fn}{tuple(sorted(names))}"
                   for k in keywords if k not in names]
    return errors


def exported(trees) -> set[str]:
    for node in trees[NPU_INIT_PY].body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {e.value for e in node.value.elts}
    return set()


def test_every_graph_api_call_of_the_backend_matches_the_wheel(wheel_zip, npu_llm_backend, model_dirs):
    generate(model_dirs["llama"], PROMPTS[:1], eager=False, max_tokens=3)  # a capture and replays
    calls = set(emulation_graph.GRAPH_API_LOG)
    assert {c[0] for c in calls} >= {"npu.NPUGraph", "npu.graph", "NPUGraph.update", "NPUGraph.replay"}
    errors = [e for c in sorted(calls) for e in check_api_call(wheel_zip, *c)]
    assert not errors, "\n".join(errors)
    names = {c[0].split(".", 1)[1] for c in calls if c[0].startswith("npu.")}
    assert names <= exported(wheel_zip), sorted(names - exported(wheel_zip))


def test_the_api_check_fails_on_what_the_wheel_lacks(wheel_zip):
    assert check_api_call(wheel_zip, "npu.graph", 1, ("auto_dispatch_capture", "pool")) == []
    assert check_api_call(wheel_zip, "npu.graph", 1, ("auto_capture",))
    assert check_api_call(wheel_zip, "NPUGraph.update", 0, ("cpu_update_inputs",))
    assert check_api_call(wheel_zip, "NPUGraph.replay", 1, ())
    assert check_api_call(wheel_zip, "npu.capture_graph", 0, ())


def test_the_wheel_updates_exactly_the_lengths_the_backend_relies_on(wheel_zip):
    """torch_npu's IFA handler registers npu_fused_infer_attention_score and updates actual_seq_lengths and
    actual_seq_lengths_kv, both keyword-only in the op's schema (so the update rewrites the call's kwargs,
    which is how the backend passes them)."""
    tree = wheel_zip[IFA_HANDLER_PY]
    registered, update_keys = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == "register_npu_graph_handler":
                    registered |= {e.value for e in deco.args[0].elts}
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "UPDATE_SPECS" for t in node.targets):
            for op, specs in zip(node.value.keys, node.value.values):
                if op.value == "npu_fused_infer_attention_score":
                    update_keys |= {spec.elts[2].value for spec in specs.elts}
    assert "npu_fused_infer_attention_score" in registered
    assert update_keys == set(emulation_graph.UPDATABLE["npu_fused_infer_attention_score"])
    path, _ = wheel.fetch_wheel()
    default = [s for s in wheel.load(path).schemas["npu_fused_infer_attention_score"] if not s.overload]
    assert default  # (the yaml declares it twice, identically)
    assert all(update_keys <= {p.name for p in sch.params if p.kw_only} for sch in default)


def test_eager_steps_take_the_lengths_from_the_host_copies(npu_llm_backend, model_dirs, monkeypatch):
    """The runtime's metadata carries host copies of the lengths, so eager attention never copies them back
    from the device (which would synchronize once a step)."""
    def no_device_read(*a, **k):
        raise AssertionError("the attention lengths were copied back from the device")

    monkeypatch.setattr(accel_backend_npu._host_lengths, "get", no_device_read)
    before = sum(1 for c in npu_llm_backend.calls if c.name == "npu_fused_infer_attention_score")
    tokens, _ = generate(model_dirs["llama"], PROMPTS[:2], eager=True, max_tokens=3)
    assert len(tokens) == 2
    assert sum(1 for c in npu_llm_backend.calls if c.name == "npu_fused_infer_attention_score") > before


def test_the_capture_runs_attention_at_the_longest_context(npu_llm_backend, model_dirs):
    """What the kernel sizes from its lengths at capture (torch_npu's handler: the workspace) must cover any
    replay: every row is captured at max_model_len, and the replays' updates then set the real lengths."""
    with LLM(model_dirs["llama"], backend=npu_table(), device="cpu", dtype=torch.bfloat16, max_num_seqs=4, kv_cache_memory=8 << 20,
             graph_batch_sizes=[4]) as llm:
        entries = [e for e in llm.graphs.graphs[4].graph._entries
                   if getattr(e, "name", None) == "npu_fused_infer_attention_score"]
        assert len(entries) == 2
        assert all(e.kwargs["actual_seq_lengths_kv"] == [llm.max_model_len] * 4 for e in entries)
        assert all(e.kwargs["actual_seq_lengths"] == [1, 2, 3, 4] for e in entries)


def test_host_copies_that_do_not_match_their_tensors_are_refused():
    """Host copies of another batch's lengths would give the kernel wrong lengths silently: a clear error."""
    from accel_models.context import AttentionMetadata, ForwardContext, forward_context

    with use_torch_npu(TorchNpuEmulation(record_globally=False)):
        ops = accel_models.resolve_ops(backend="npu", allow_unavailable=True)
        args = attention_args(ops)
        md = AttentionMetadata(query_start_loc=args["query_start_loc"], seq_lens=args["seq_lens"],
                               block_table=args["block_table"], slot_mapping=torch.tensor([4, 136]), max_query_len=1,
                               max_seq_len=128, num_actual_tokens=2, query_start_loc_host=[0, 1, 2, 3],
                               seq_lens_host=[5, 9, 1])
        with forward_context(ForwardContext(md, {})), pytest.raises(ValueError, match="host copies do not match"):
            ops.paged_attention(**args)
        copied_back = ops.paged_attention(**args)  # outside a forward context: the lengths read from the tensors
        ok = AttentionMetadata(**{**md.__dict__, "query_start_loc_host": [0, 1, 2], "seq_lens_host": [5, 9]})
        with forward_context(ForwardContext(ok, {})):
            assert torch.equal(ops.paged_attention(**args), copied_back)
