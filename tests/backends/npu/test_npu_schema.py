"""Every torch_npu call the NPU backend makes, checked against the schemas of the real torch-npu 2.13.0 wheel.

The wheel is downloaded at test time (``pip download torch-npu==2.13.0 --no-deps``, cached; never installed)
and read as a zip. The calls are the ones the emulation recorded: those of a workload that drives every
code path of the backend that reaches torch_npu, plus every call recorded earlier in this test session.
A call fails the check when the function is not declared (or not exposed as ``torch_npu.<name>``), uses a
keyword the schema lacks, passes a keyword-only parameter positionally, omits a required argument or
passes an argument of the wrong kind. If PyPI cannot be reached these tests skip, saying why.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import accel_backend_npu
import accel_models
import npu_wheel_schema as wheel
from accel_backend_npu import emulation, get_torch_npu, use_torch_npu

# The one emulated function the wheel's _op_plugin_docs.py does not document: it is emulated from its
# codegen schema (x1 + x2, then RMS norm; returns (y, rstd, x)) and vllm-ascend's use of it.
SCHEMA_ONLY = {"npu_add_rms_norm"}


@pytest.fixture(scope="module")
def ws() -> wheel.WheelSchemas:
    path, why = wheel.fetch_wheel()
    if path is None:
        pytest.skip(f"cannot download torch-npu=={wheel.TORCH_NPU_VERSION} from PyPI ({why}); "
                    "the schema check needs the real wheel")
    return wheel.load(path)


def backend_torch_npu_calls() -> set[str]:
    """Names of the torch_npu functions the backend's source calls (``get_torch_npu().X`` / ``tnpu.X``)."""
    tree = ast.parse(Path(inspect.getfile(accel_backend_npu)).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            v = node.value
            if (isinstance(v, ast.Name) and v.id == "tnpu") or (
                    isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "get_torch_npu"):
                names.add(node.attr)
    return names


def coverage_workload() -> emulation.TorchNpuEmulation:
    """Drive every backend code path that calls torch_npu, over a fresh emulation."""
    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    with use_torch_npu(emulation.TorchNpuEmulation()) as emu:
        ops = accel_models.resolve_ops(backend="npu", allow_unavailable=True, strict=True)
        x = torch.randn((5, 64), generator=g).to(bf16)
        w = torch.randn(64, generator=g).to(bf16)
        ops.rms_norm(x=x, weight=w, eps=1e-6)
        ops.fused_add_rms_norm(x=x, residual=x.clone(), weight=w, eps=1e-6)
        ops.silu_and_mul(x=x)
        ops.gelu_and_mul(x=x, approximate="tanh")
        cache = torch.randn((256, 64), generator=g)
        ops.rotary_embedding(positions=torch.arange(5), query=torch.randn((5, 128), generator=g).to(bf16),
                             key=torch.randn((5, 64), generator=g).to(bf16), cos_sin_cache=cache, head_size=64,
                             rotary_dim=64, is_neox=False)
        kv = ops.allocate_kv_cache(num_blocks=4, block_size=128, num_kv_heads=1, head_size=64, dtype=bf16,
                                   device=torch.device("cpu"))
        seq = 200
        ops.write_kv_cache(key=torch.randn((seq + 1, 1, 64), generator=g).to(bf16),
                           value=torch.randn((seq + 1, 1, 64), generator=g).to(bf16), kv_cache=kv,
                           slot_mapping=torch.cat((torch.arange(seq), torch.tensor([-1]))))
        for window in (None, 16):
            ops.paged_attention(query=torch.randn((seq + 1, 2, 64), generator=g).to(bf16), kv_cache=kv,
                                block_table=torch.tensor([[0, 1], [0, 1]], dtype=torch.int32),
                                seq_lens=torch.tensor([seq, seq], dtype=torch.int32),
                                query_start_loc=torch.tensor([0, seq, seq + 1], dtype=torch.int32),
                                max_query_len=seq, max_seq_len=seq, scale=0.125, sliding_window=window,
                                logits_soft_cap=None)
        logits = torch.randn((6, 16), generator=g)
        ops.moe_topk(router_logits=logits, top_k=2, scoring_func="softmax", renormalize=True, num_expert_group=None,
                     topk_group=None, e_score_correction_bias=None, routed_scaling_factor=1.0)
        ops.moe_topk(router_logits=logits, top_k=2, scoring_func="sigmoid", renormalize=True, num_expert_group=4,
                     topk_group=2, e_score_correction_bias=torch.zeros(16), routed_scaling_factor=2.0)
        for activation in ("silu", "gelu"):
            ops.fused_experts(hidden_states=x, w13=torch.randn((4, 32, 64), generator=g).to(bf16),
                              w2=torch.randn((4, 64, 16), generator=g).to(bf16), topk_weights=torch.rand((5, 2)),
                              topk_ids=torch.randint(0, 8, (5, 2), generator=g, dtype=torch.int32),
                              activation=activation, expert_map=torch.tensor([0, -1, 1, -1, 2, -1, 3, -1],
                                                                             dtype=torch.int32))
        a, s = ops.dynamic_int8_quant(x=x)
        for out_dtype in (bf16, torch.float16):
            ops.int8_scaled_mm(a=a, b=a[:3], scale_a=s, scale_b=s[:3, 0], out_dtype=out_dtype,
                               bias=torch.zeros(3))
    return emu


def test_wheel_ships_the_files_this_check_reads(ws: wheel.WheelSchemas):
    assert all(ws.files.values()), ws.files
    assert len(ws.schemas) > 500 and len(ws.documented) > 100


def test_every_torch_npu_call_of_the_backend_matches_the_wheel(ws: wheel.WheelSchemas):
    emu = coverage_workload()
    source_calls = backend_torch_npu_calls()
    exercised = {c.name for c in emu.calls}
    assert source_calls <= exercised, f"not exercised by the workload: {sorted(source_calls - exercised)}"
    calls = list(dict.fromkeys([*emu.calls, *emulation.CALL_LOG]))  # + everything the op tests recorded
    errors = [e for c in calls for e in wheel.check_call(c, ws)]
    assert not errors, "\n".join(errors)
    # The emulation covers exactly what the backend calls, each op documented in the wheel.
    assert set(emulation.EMULATED_FUNCTIONS) == source_calls
    undocumented = set(emulation.EMULATED_FUNCTIONS) - ws.documented - SCHEMA_ONLY
    assert not undocumented, f"emulated without documentation in {wheel.DOCS_PATH}: {sorted(undocumented)}"


def _call(name, *args, **kwargs) -> emulation.RecordedCall:
    return emulation.RecordedCall(name, tuple(emulation.describe(a) for a in args),
                                  tuple(sorted((k, emulation.describe(v)) for k, v in kwargs.items())))


def test_the_check_fails_on_calls_the_wheel_does_not_declare(ws: wheel.WheelSchemas):
    t = torch.zeros(2, 2)
    bad = {
        "not declared": _call("npu_rms_norm_v9", t, t, epsilon=1e-6),
        "ATB op": _call("_npu_reshape_and_cache", t, t, t, t, t),
        "unknown keyword 'eps'": _call("npu_rms_norm", t, t, eps=1e-6),
        "required argument 'skip1'": _call("npu_moe_finalize_routing", t, expanded_src_to_dst_row=t),
        "positional": _call("npu_fused_infer_attention_score", t, t, t, t),
        "'actual_seq_lengths' is SymInt[]?": _call("npu_fused_infer_attention_score", t, t, t, actual_seq_lengths=t),
        "pass the op's first tensor positionally": _call("npu_swiglu", self=t),
    }
    for expect, call in bad.items():
        errors = wheel.check_call(call, ws)
        assert errors and expect in " ".join(errors), (expect, errors)
    assert wheel.check_call(_call("npu_rms_norm", t, t, epsilon=1e-6), ws) == []
    assert wheel.check_call(_call("npu_quant_matmul", t, t, t, pertoken_scale=t, output_dtype=torch.bfloat16), ws) == []


def test_a_backend_calling_an_undeclared_function_is_caught_end_to_end(ws: wheel.WheelSchemas):
    """A mutant op written like the backend's (through get_torch_npu) records its call, and the check fails."""

    def mutant_rms_norm(x, weight, eps):
        return get_torch_npu().npu_rms_norm(x, weight, eps=eps)  # the schema's keyword is `epsilon`

    emu = emulation.TorchNpuEmulation(record_globally=False)
    with use_torch_npu(emu), pytest.raises(TypeError):
        mutant_rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
    errors = [e for c in emu.calls for e in wheel.check_call(c, ws)]
    assert errors and "unknown keyword 'eps'" in errors[0]

    class WithExtra(emulation.TorchNpuEmulation):
        def __init__(self):
            super().__init__(record_globally=False)
            self.npu_rms_norm_fast = self._recording("npu_rms_norm_fast", emulation.npu_rms_norm)

    emu = WithExtra()
    with use_torch_npu(emu):
        get_torch_npu().npu_rms_norm_fast(torch.ones(2, 8), torch.ones(8), epsilon=1e-6)
    errors = [e for c in emu.calls for e in wheel.check_call(c, ws)]
    assert errors and "not declared" in errors[0]
