"""CPU-side tests of the CUDA backend: availability, argument checks, KV layout, launch planning, expert sort.

CI has no GPU. What runs on the host is tested here against independent expectations; the kernels
themselves run through Triton's interpreter in test_cuda_interpret.py and on an H100 in bench/cuda/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import accel_backend_cuda as C
from accel_models import BackendError, resolve_ops
from accel_models.backends import OP_NAMES, get_registry, reset_registry

FLOATS = (torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------------


def test_info_fields():
    info = C.accel_backend_info()
    assert (info.name, info.device_type, info.dist_backend) == ("cuda", "cuda", "nccl")
    assert info.priority > -100  # above the reference


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_unusable_without_a_device():
    info = C.accel_backend_info()
    assert not info.available
    assert info.reason.startswith("no CUDA device")
    assert "torch.cuda.is_available() is False" in info.reason


def test_reasons_for_each_missing_piece(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(C.importlib.util, "find_spec", lambda name: None)
    ok, reason = C.availability()
    assert not ok and "Triton is not installed" in reason and "pip install triton" in reason

    monkeypatch.setattr(C.importlib.util, "find_spec", lambda name: object())

    def broken(name):
        raise ImportError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(C.importlib, "import_module", broken)
    ok, reason = C.availability()
    assert not ok and "Triton failed to import" in reason and "libcuda" in reason

    monkeypatch.setattr(C.importlib, "import_module", lambda name: object())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    ok, reason = C.availability()
    assert not ok and "compute capability 7.5" in reason and "8.0" in reason

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert C.availability() == (True, None)
    info = C.accel_backend_info()
    assert info.available and info.reason is None


def test_backend_info_never_raises(monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(C, "availability", boom)
    info = C.accel_backend_info()
    assert not info.available and "driver exploded" in info.reason


def test_module_does_not_import_triton_at_import_time():
    """Only function bodies may import Triton: the backend must import (and report why it is unusable)
    on machines without it."""
    import ast

    tree = ast.parse(Path(C.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not any(name.split(".")[0] == "triton" or "_triton_kernels" in name for name in names)


def test_kernels_in_the_interpreter():
    """Run test_cuda_interpret.py in a fresh process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton", reason="the CUDA backend's kernels need Triton (its interpreter runs them on CPU)")
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_cuda_interpret.py")],
                         capture_output=True, text=True, env=env, cwd=here.parents[2])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_registry_reports_it_and_refuses_to_select_it(monkeypatch):
    monkeypatch.delenv("ACCEL_BACKEND", raising=False)
    reset_registry()
    try:
        rec = get_registry().records["cuda"]
        assert not rec.usable and rec.reason.startswith("no CUDA device")
        assert rec.ops == frozenset(OP_NAMES)  # every op is native
        with pytest.raises(BackendError, match="no CUDA device"):
            resolve_ops("cuda")
        table = resolve_ops("cuda", allow_unavailable=True, strict=True)
        assert table.fallbacks == [] and table.device_type == "cuda"
        assert resolve_ops().backend != "cuda"  # auto-selection skips it here
    finally:
        reset_registry()


# ----------------------------------------------------------------------------------------------------
# argument checks (all raise before any kernel is touched)
# ----------------------------------------------------------------------------------------------------


def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        C.accel_rms_norm(x=torch.randn(2, 8), weight=torch.ones(8), eps=1e-6)
    with pytest.raises(ValueError, match="not a CUDA device"):
        C.accel_allocate_kv_cache(num_blocks=2, block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32,
                                  device=torch.device("cpu"))


@pytest.fixture
def host_tensors_ok(monkeypatch):
    """Let CPU tensors through the device check (the interpreter's mode) so shape checks are reached."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: C.accel_rms_norm(x=torch.randn(2, 8), weight=torch.ones(7), eps=1e-6), r"weight has shape \(7,\)"),
        (lambda: C.accel_rms_norm(x=torch.randn(2, 8, dtype=torch.float64), weight=torch.ones(8), eps=1e-6),
         "float64"),
        (lambda: C.accel_fused_add_rms_norm(x=torch.randn(2, 8), residual=torch.randn(3, 8), weight=torch.ones(8),
                                            eps=1e-6), "residual has shape"),
        (lambda: C.accel_silu_and_mul(x=torch.randn(3, 7)), "must be even"),
        (lambda: C.accel_gelu_and_mul(x=torch.randn(3, 8), approximate="fast"), "'none' or 'tanh'"),
        (lambda: C.accel_rotary_embedding(positions=torch.zeros(4, dtype=torch.int32), query=torch.randn(4, 16),
                                          key=None, cos_sin_cache=torch.randn(8, 16), head_size=16, rotary_dim=16,
                                          is_neox=True), "positions must be a 1-D torch.int64"),
        (lambda: C.accel_rotary_embedding(positions=torch.zeros(4, dtype=torch.int64), query=torch.randn(4, 16),
                                          key=None, cos_sin_cache=torch.randn(8, 16), head_size=16, rotary_dim=7,
                                          is_neox=True), "rotary_dim must be even"),
        (lambda: C.accel_rotary_embedding(positions=torch.zeros(4, dtype=torch.int64), query=torch.randn(4, 20),
                                          key=None, cos_sin_cache=torch.randn(8, 16), head_size=16, rotary_dim=16,
                                          is_neox=True), "query has shape"),
        (lambda: C.accel_kv_cache_layout(num_kv_heads=2, head_size=512, dtype=torch.float16), "head_size 512"),
        (lambda: C.accel_kv_cache_layout(num_kv_heads=2, head_size=64, dtype=torch.float64), "float64"),
        (lambda: C.accel_allocate_kv_cache(num_blocks=4, block_size=8, num_kv_heads=1, head_size=64,
                                           dtype=torch.float16, device="cpu"), "block_size 8"),
        (lambda: C.accel_write_kv_cache(key=torch.randn(3, 2, 8), value=torch.randn(3, 2, 8),
                                        kv_cache=torch.empty(2, 4, 16, 2, 8), slot_mapping=torch.zeros(3, dtype=torch.int64)),
         "the cuda layout is"),  # a cache in the reference's layout
        (lambda: C.accel_write_kv_cache(key=torch.randn(3, 2, 8), value=torch.randn(3, 2, 8),
                                        kv_cache=torch.empty(2, 4, 2, 16, 8), slot_mapping=torch.zeros(3, dtype=torch.int32)),
         "slot_mapping must be a 1-D torch.int64"),
        (lambda: C.accel_fused_experts(hidden_states=torch.randn(3, 8), w13=torch.randn(2, 6, 8),
                                       w2=torch.randn(2, 8, 4), topk_weights=torch.rand(3, 1),
                                       topk_ids=torch.zeros(3, 1, dtype=torch.int32), activation="silu",
                                       expert_map=None), "do not fit"),
        (lambda: C.accel_fused_experts(hidden_states=torch.randn(3, 8), w13=torch.randn(2, 8, 8),
                                       w2=torch.randn(2, 8, 4), topk_weights=torch.rand(3, 1),
                                       topk_ids=torch.zeros(3, 1, dtype=torch.int32), activation="relu",
                                       expert_map=None), "'silu' or 'gelu'"),
        (lambda: C.accel_moe_topk(router_logits=torch.randn(3, 8), top_k=9, scoring_func="softmax", renormalize=True,
                                  num_expert_group=None, topk_group=None, e_score_correction_bias=None,
                                  routed_scaling_factor=1.0), "top_k must be in"),
        (lambda: C.accel_moe_topk(router_logits=torch.randn(3, 8), top_k=2, scoring_func="relu", renormalize=True,
                                  num_expert_group=None, topk_group=None, e_score_correction_bias=None,
                                  routed_scaling_factor=1.0), "'softmax' or 'sigmoid'"),
        (lambda: C.accel_dynamic_int8_quant(x=torch.randn(2, 3, 4)), "2-D"),
        # fused ops (API 1.3)
        (lambda: C.accel_rope_and_write_kv_cache(
            positions=torch.zeros(3, dtype=torch.int64), query=torch.randn(3, 4, 8), key=torch.randn(3, 2, 8),
            value=torch.randn(3, 2, 8), cos_sin_cache=torch.randn(8, 8), head_size=8, rotary_dim=8, is_neox=True,
            kv_cache=torch.empty(2, 4, 16, 2, 8), slot_mapping=torch.zeros(3, dtype=torch.int64)), "the cuda layout is"),
        (lambda: C.accel_rope_and_write_kv_cache(
            positions=torch.zeros(3, dtype=torch.int64), query=torch.randn(3, 32), key=torch.randn(3, 2, 8),
            value=torch.randn(3, 2, 8), cos_sin_cache=torch.randn(8, 8), head_size=8, rotary_dim=8, is_neox=True,
            kv_cache=torch.empty(2, 4, 2, 16, 8), slot_mapping=torch.zeros(3, dtype=torch.int64)), "query must be 3-D"),
        (lambda: C.accel_rope_and_write_kv_cache(
            positions=torch.zeros(3, dtype=torch.int64), query=torch.randn(3, 4, 8), key=torch.randn(3, 2, 8),
            value=torch.randn(3, 3, 8), cos_sin_cache=torch.randn(8, 8), head_size=8, rotary_dim=8, is_neox=True,
            kv_cache=torch.empty(2, 4, 2, 16, 8), slot_mapping=torch.zeros(3, dtype=torch.int64)), "value has shape"),
        (lambda: C.accel_rope_and_write_kv_cache(
            positions=torch.zeros(3, dtype=torch.int64), query=torch.randn(3, 4, 8),
            key=torch.randn(3, 2, 8, dtype=torch.float16), value=torch.randn(3, 2, 8), cos_sin_cache=torch.randn(8, 8),
            head_size=8, rotary_dim=8, is_neox=True, kv_cache=torch.empty(2, 4, 2, 16, 8),
            slot_mapping=torch.zeros(3, dtype=torch.int64)), "key has dtype torch.float16"),
        (lambda: C.accel_act_and_mul_linear(x=torch.randn(3, 16), weight=torch.randn(4, 8), bias=None, prepared=None,
                                            activation="gelu_new"), "activation must be one of"),
        (lambda: C.accel_act_and_mul_linear(x=torch.randn(3, 16), weight=torch.randn(4, 6), bias=None, prepared=None,
                                            activation="silu"), r"x \[..., 2 \* k\] and weight"),
        (lambda: C.accel_int8_scaled_mm(a=torch.zeros(2, 8, dtype=torch.int8), b=torch.zeros(4, 7, dtype=torch.int8),
                                        scale_a=torch.ones(2, 1), scale_b=torch.ones(4), out_dtype=torch.float32,
                                        bias=None), r"b must be \[n, k=8\]"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(host_tensors_ok, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_paged_attention_argument_checks(host_tensors_ok):
    cache = C.accel_allocate_kv_cache(num_blocks=4, block_size=16, num_kv_heads=2, head_size=8,
                                      dtype=torch.float32, device="cpu")
    ok = dict(kv_cache=cache, block_table=torch.zeros(1, 2, dtype=torch.int32), seq_lens=torch.tensor([3], dtype=torch.int32),
              query_start_loc=torch.tensor([0, 3], dtype=torch.int32), max_query_len=3, max_seq_len=3, scale=1.0,
              sliding_window=None, logits_soft_cap=None)
    with pytest.raises(ValueError, match="heads must be a multiple of KV heads"):
        C.accel_paged_attention(query=torch.randn(3, 3, 8), **ok)
    with pytest.raises(ValueError, match="block_table must be a 2-D torch.int32"):
        C.accel_paged_attention(query=torch.randn(3, 4, 8), **{**ok, "block_table": torch.zeros(1, 2, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"query_start_loc must be \[B\+1\]"):
        C.accel_paged_attention(query=torch.randn(3, 4, 8), **{**ok, "query_start_loc": torch.tensor([0], dtype=torch.int32)})


# ----------------------------------------------------------------------------------------------------
# KV-cache layout
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layout_and_allocation(host_tensors_ok, dtype):
    layout = C.accel_kv_cache_layout(num_kv_heads=3, head_size=80, dtype=dtype)
    assert layout.block_sizes == (16, 32, 64, 128) and layout.block_sizes[0] == 16
    assert layout.bytes_per_token == 2 * 3 * 80 * torch.empty((), dtype=dtype).element_size()
    assert layout.name == "[2, num_blocks, num_kv_heads, block_size, head_size]"
    for bs in layout.block_sizes:
        cache = C.accel_allocate_kv_cache(num_blocks=5, block_size=bs, num_kv_heads=3, head_size=80, dtype=dtype,
                                          device="cpu")
        assert cache.shape == (2, 5, 3, bs, 80) and cache.dtype == dtype
        # bytes per token slot as declared
        assert cache.numel() * cache.element_size() == 5 * bs * layout.bytes_per_token


# ----------------------------------------------------------------------------------------------------
# attention launch plan
# ----------------------------------------------------------------------------------------------------


def _find_seq(qsl: list[int], target: int, block_q: int) -> int:
    """The kernel's binary search (``_find_seq``), in Python."""
    lo, hi = 0, len(qsl) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if qsl[mid] // block_q + mid <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@given(q_lens=st.one_of(st.lists(st.integers(1, 70), min_size=1, max_size=8),
                        st.lists(st.just(1), min_size=1, max_size=70)), group=st.sampled_from([1, 2, 3, 4, 7, 8, 16]),
       kv_heads=st.integers(1, 4), extra_ctx=st.integers(0, 5000), head_size=st.sampled_from([32, 64, 80, 128, 256]))
def test_plan_grid_covers_every_query_row_once(q_lens, group, kv_heads, extra_ctx, head_size):
    num_tokens = sum(q_lens)
    plan = C.attention_plan(num_tokens=num_tokens, num_seqs=len(q_lens), num_heads=group * kv_heads,
                            num_kv_heads=kv_heads, head_size=head_size, max_query_len=max(q_lens),
                            max_seq_len=max(q_lens) + extra_ctx, num_sms=132)
    assert plan.block_q >= 1 and plan.block_q * group <= plan.block_m and plan.block_m >= 16
    assert plan.head_pad >= max(16, head_size) and plan.head_pad & (plan.head_pad - 1) == 0
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    seen = [0] * num_tokens
    assert plan.decode == (max(q_lens) == 1)
    for pid in range(plan.num_q_programs):  # what each program of grid axis 0 computes
        if plan.decode:  # one query token per sequence: program b is sequence b
            b, qb = pid, 0
        else:
            b = _find_seq(qsl, pid, plan.block_q)
            qb = pid - (qsl[b] // plan.block_q + b)
        if qb * plan.block_q >= q_lens[b]:
            continue  # an idle program
        assert qb >= 0
        for t in range(qb * plan.block_q, min((qb + 1) * plan.block_q, q_lens[b])):
            seen[qsl[b] + t] += 1
    assert seen == [1] * num_tokens


def test_plan_splits_only_when_the_gpu_would_idle():
    kw = dict(num_heads=32, num_kv_heads=8, head_size=128, max_query_len=1, num_sms=132)
    big = C.attention_plan(num_tokens=64, num_seqs=64, max_seq_len=4096, **kw)
    assert big.num_splits == 1 and big.block_q == 1 and big.block_m == 16  # 512 programs fill 132 SMs
    small = C.attention_plan(num_tokens=4, num_seqs=4, max_seq_len=16384, **kw)
    assert small.num_splits == 17  # ceil(4 * 132 / 32 programs), what the H100 run used
    short = C.attention_plan(num_tokens=4, num_seqs=4, max_seq_len=200, **kw)
    assert short.num_splits == 4  # 32 programs leave most SMs idle: one 64-key tile per split (issue 11)
    batch1 = C.attention_plan(num_tokens=1, num_seqs=1, max_seq_len=256, **kw)
    assert batch1.num_splits == 4  # the benchmark's batch-1 graph (max_model_len 256)
    assert batch1.decode and batch1.num_q_programs == 1 and big.num_q_programs == 64  # a program per sequence
    mid = C.attention_plan(num_tokens=16, num_seqs=16, max_seq_len=200, **kw)
    assert mid.num_splits == 1  # 128 programs: splitting a short context measured slower on the H100
    mid_long = C.attention_plan(num_tokens=16, num_seqs=16, max_seq_len=4096, **kw)
    assert mid_long.num_splits == 5  # long contexts keep the 256-key rule below 2x SMs
    tiny = C.attention_plan(num_tokens=1, num_seqs=1, max_seq_len=64, **kw)
    assert tiny.num_splits == 1  # one tile: nothing to split
    prefill = C.attention_plan(num_tokens=4096, num_seqs=2, max_seq_len=2048, **{**kw, "max_query_len": 2048})
    assert prefill.num_splits == 1 and prefill.block_m == 64 and prefill.block_q == 16
    capped = C.attention_plan(num_tokens=4, num_seqs=4, max_seq_len=16384, workspace_limit_bytes=1 << 16, **kw)
    assert capped.num_splits == max(1, (1 << 16) // (4 * 32 * 130 * 4))


@pytest.mark.parametrize("head_size, tile_n", [(64, 128), (128, 64), (256, 32)])
def test_plan_prefetches_where_each_sm_has_one_program(head_size, tile_n):
    kw = dict(num_heads=32, num_kv_heads=8, head_size=head_size, max_query_len=1, num_sms=132, max_seq_len=256)
    b16 = C.attention_plan(num_tokens=16, num_seqs=16, **kw)  # 128 programs on 132 SMs: latency-bound
    assert b16.prefetch and b16.num_splits == 1 and b16.num_warps == 8 and b16.num_stages == 1
    assert b16.tile_n == tile_n  # 8192 key x head elements a tile
    b64 = C.attention_plan(num_tokens=64, num_seqs=64, **kw)  # 512 programs: the plain loop, 8192-element tiles
    assert not b64.prefetch and b64.tile_n == max(64, tile_n) and b64.num_warps == 4 and b64.num_stages == 2
    b17 = C.attention_plan(num_tokens=17, num_seqs=17, **kw)  # 136 programs: more than SMs
    assert not b17.prefetch and b17.tile_n == b64.tile_n
    old = C.attention_plan(num_tokens=64, num_seqs=64, **kw, config={
        "attn_decode": {"BLOCK_M": 16, "TILE_N": 64, "num_warps": 4, "num_stages": 2, "split_keys": 64,
                        "split_below": 0.5, "split_target": 4, "prefetch_below": 1.0, "prefetch_elems": 8192,
                        "prefetch_warps": 8, "prefetch_stages": 1},
        "attn_prefill": {"BLOCK_M": 64, "TILE_N": 32, "num_warps": 4, "num_stages": 3}})
    assert old.tile_n == 64  # without busy_elems: the configured TILE_N
    b1 = C.attention_plan(num_tokens=1, num_seqs=1, **kw)  # split: the plain loop (measured faster there)
    assert b1.num_splits > 1 and not b1.prefetch
    prefill = C.attention_plan(num_tokens=64, num_seqs=1, **{**kw, "max_query_len": 64})
    assert not prefill.prefetch


def test_rows_layer_takes_batches_whose_attention_programs_exceed_the_sms(monkeypatch):
    """decoder_layer_rows (rotary + attention in one launch) from more than min_programs x SMs programs
    (tokens x KV heads): on a 132-SM H200 with 8 KV heads batch 17 and up; batch 16 stays op by op (there
    the paged kernel's prefetching loop measured faster); one token is the persistent kernel's."""
    pytest.importorskip("triton", reason="the CUDA backend's kernels need Triton")
    monkeypatch.setattr(C, "_num_sms", lambda device: 132)
    cache = torch.empty(2, 4, 8, 16, 64, dtype=torch.bfloat16)
    w = {"qkv": torch.empty(3072, 2048, dtype=torch.bfloat16)}

    def why(tokens, kv_heads=8, **kw):
        hid = torch.empty(tokens, 2048, dtype=torch.bfloat16)
        return C.rows_layer_unsupported(hid, w, kw.get("head_size", 64), 32, kv_heads, kw.get("rotary_dim", 64),
                                        kw.get("cache", cache))

    assert why(17) is None and why(64) is None
    assert "min_programs" in why(16) and "two or more tokens" in why(1)
    assert why(64, kv_heads=2) is not None  # 128 programs: op by op
    assert "partial rotary" in why(64, rotary_dim=32)
    assert "KV cache dtype" in why(64, cache=cache.float())


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("max_query_len", [1, 512])
def test_plan_fits_shared_memory(itemsize, head_size, max_query_len):
    p = C.attention_plan(num_tokens=max_query_len, num_seqs=1, num_heads=8, num_kv_heads=2, head_size=head_size,
                         max_query_len=max_query_len, max_seq_len=4096, num_sms=132, itemsize=itemsize)
    assert (p.block_m * p.head_pad + p.num_stages * 2 * p.tile_n * p.head_pad) * itemsize <= C.SMEM_BUDGET
    assert p.tile_n >= 16 and p.num_stages >= 1


def test_moe_config_fits_shared_memory():
    bf16 = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    assert C.fit_moe_config(bf16, 2, gate_up=True) == bf16  # the tuned bf16 tiles are kept
    fp32 = C.fit_moe_config(bf16, 4, gate_up=True)
    assert fp32["BLOCK_K"] == 32 and fp32["BLOCK_N"] == 128
    per_stage = fp32["BLOCK_M"] * fp32["BLOCK_K"] + 2 * fp32["BLOCK_K"] * fp32["BLOCK_N"]
    assert fp32["num_stages"] * per_stage * 4 <= C.SMEM_BUDGET


# ----------------------------------------------------------------------------------------------------
# expert sort
# ----------------------------------------------------------------------------------------------------


@given(ids=st.lists(st.integers(-1, 9), min_size=0, max_size=60), num_experts=st.integers(1, 10),
       block_m=st.sampled_from([1, 4, 16, 64]))
def test_moe_align_places_every_local_pair_once_in_its_experts_blocks(ids, num_experts, block_m):
    ids = [i if i < num_experts else -1 for i in ids]
    local = torch.tensor(ids, dtype=torch.int64)
    sorted_pair, block_expert = C.moe_align(local, num_experts, block_m)
    num_pairs = len(ids)
    assert sorted_pair.dtype == torch.int32 and block_expert.dtype == torch.int32
    assert sorted_pair.numel() == block_expert.numel() * block_m
    assert block_expert.numel() == num_pairs // block_m + min(num_experts, num_pairs) + 1
    rows = sorted_pair.view(-1, block_m).tolist()
    placed = []
    for blk, exp in zip(rows, block_expert.tolist()):
        real = [p for p in blk if p != num_pairs]
        if exp < 0:
            assert not real  # blocks past the end hold only padding
            continue
        assert all(ids[p] == exp for p in real)  # every pair of a block belongs to its expert
        placed += real
    assert sorted(placed) == [i for i, e in enumerate(ids) if e >= 0]
    # each expert's pairs are contiguous, in pair order (a stable sort), and its blocks consecutive
    order = [e for e in block_expert.tolist() if e >= 0]
    assert order == sorted(order)


# ----------------------------------------------------------------------------------------------------
# fused_experts decode path plan (issue 11)
# ----------------------------------------------------------------------------------------------------


def test_moe_decode_plan_only_for_few_pairs():
    max_pairs = C.MOE_DECODE_CONFIG["max_pairs"]
    assert C.moe_decode_plan(0, 16, 2048, 1024) is None  # nothing to do: the launcher returns zeros
    assert C.moe_decode_plan(max_pairs + 1, 16, 2048, 1024) is None  # prefill-sized: the sorted grouped GEMM
    assert C.moe_decode_plan(1, 16, 2048, 1024, config={"moe_decode": {**C.MOE_DECODE_CONFIG, "max_pairs": 0}}) is None
    one = C.moe_decode_plan(2, 16, 2048, 1024)  # Mixtral, one token: a slot per pair, both routed experts work
    assert one["BLOCK_M"] == 16 and not one["BY_EXPERT"] and one["slots"] == 2
    full = C.moe_decode_plan(max_pairs, 16, 2048, 1024)  # more pairs than experts: a slot per local expert
    assert full["BY_EXPERT"] and full["slots"] == 16 and full["BLOCK_M"] >= max_pairs
    # the dot tile follows config "rows", never wider than the routing vector; None keeps one tile of all pairs
    rows = C.MOE_DECODE_CONFIG["rows"]
    assert full["BLOCK_R"] == min(full["BLOCK_M"], max(16, rows)) and one["BLOCK_R"] == 16
    cfg = {"moe_decode": {**C.MOE_DECODE_CONFIG, "rows": None}}
    assert C.moe_decode_plan(max_pairs, 16, 2048, 1024, config=cfg)["BLOCK_R"] == full["BLOCK_M"]
    cfg = {"moe_decode": {**C.MOE_DECODE_CONFIG, "rows": 20}}
    assert C.moe_decode_plan(max_pairs, 16, 2048, 1024, config=cfg)["BLOCK_R"] == 32  # a pow2 tile
    # few pairs take the "small" tiles, more the wide ones (the H200 sweep of session 13); without "small",
    # every size takes the wide ones
    small = C.MOE_DECODE_CONFIG["small"]
    for pairs in (2, small["max_pairs"]):
        p = C.moe_decode_plan(pairs, 16, 2048, 1024)
        assert p["up"]["BLOCK_N"] == small["up"]["BLOCK_N"] and p["down"]["BLOCK_N"] == small["down"]["BLOCK_N"]
    wide = C.moe_decode_plan(small["max_pairs"] + 1, 16, 2048, 1024)
    assert wide["up"] == C.MOE_DECODE_CONFIG["up"] and wide["down"] == C.MOE_DECODE_CONFIG["down"]
    cfg = {"moe_decode": {k: v for k, v in C.MOE_DECODE_CONFIG.items() if k != "small"}}
    assert C.moe_decode_plan(2, 16, 2048, 1024, config=cfg)["up"] == C.MOE_DECODE_CONFIG["up"]


@given(pairs=st.integers(1, C.MOE_DECODE_CONFIG["max_pairs"]), num_local=st.integers(1, 300),
       hidden=st.integers(1, 8192), inter=st.integers(1, 8192), itemsize=st.sampled_from([2, 4]))
def test_moe_decode_plan_covers_the_pairs_and_fits_shared_memory(pairs, num_local, hidden, inter, itemsize):
    p = C.moe_decode_plan(pairs, num_local, hidden, inter, itemsize)
    assert p["BLOCK_M"] >= max(16, pairs) and p["BLOCK_M"] & (p["BLOCK_M"] - 1) == 0  # one pow2 routing vector
    assert 16 <= p["BLOCK_R"] <= p["BLOCK_M"] and p["BLOCK_R"] & (p["BLOCK_R"] - 1) == 0  # the dot's pow2 rows
    # one slot per local expert, or one per pair: either way every routed expert has a program row
    assert p["slots"] == (num_local if p["BY_EXPERT"] else pairs) and p["BY_EXPERT"] == (num_local <= pairs)
    for name, weights in (("up", 2), ("down", 1)):
        t = p[name]
        assert t["BLOCK_N"] >= 16 and t["BLOCK_K"] >= 16 and t["num_stages"] >= 1
        assert t["num_stages"] * (p["BLOCK_R"] + weights * t["BLOCK_N"]) * t["BLOCK_K"] * itemsize <= C.SMEM_BUDGET


# ----------------------------------------------------------------------------------------------------
# small-M linear plan (issue 11)
# ----------------------------------------------------------------------------------------------------


def test_linear_plan_small_m_only_for_large_weights():
    # cuBLAS for prefill-sized m and for the small weights that measured a tie (qkv / o_proj of a 1B model)
    assert C.linear_plan(64, 16384, 2048, 132) is None
    # the wide entry (off by default): only its rows and its weight sizes (Llama-1B's down_proj, not gate_up)
    wide = {"linear": {"wide": C.WIDE_DOWN}}
    plan = C.linear_plan(64, 2048, 8192, 132, wide)
    assert plan["BLOCK_M"] == 64 and plan["BLOCK_N"] == 64 and plan["SPLIT_K"] == 4 and plan["USE_DOT"] == 1
    assert C.linear_plan(17, 2048, 8192, 132, wide)["BLOCK_M"] == 32
    assert C.linear_plan(64, 16384, 2048, 132, wide) is None and C.linear_plan(65, 2048, 8192, 132, wide) is None
    assert C.linear_plan(64, 2048, 8192, 132, wide, act=True) is None
    assert C.linear_plan(16, 2048, 8192, 132, wide) == C.linear_plan(16, 2048, 8192, 132)  # up to max_m: as before
    assert C.linear_plan(1, 3072, 2048, 132) is None and C.linear_plan(1, 2048, 2048, 132) is None
    assert C.linear_plan(0, 16384, 2048, 132) is None
    up = C.linear_plan(1, 16384, 2048, 132)
    assert up is not None and up["SPLIT_K"] == 1 and up["BLOCK_M"] == 16  # 512 row tiles fill the GPU
    down = C.linear_plan(1, 2048, 8192, 132)
    assert down is not None and down["SPLIT_K"] > 1  # 64 row tiles: split k so every SM streams
    assert C.linear_plan(16, 2048, 8192, 132)["BLOCK_K"] < down["BLOCK_K"]  # the 9..16-row tiles
    assert C.linear_plan(1, 128256, 2048, 132)["SPLIT_K"] == 1
    assert C.linear_plan(1, 16384, 2048, 132, itemsize=4) is not None


def test_act_and_mul_linear_plan_uses_an_fma_tile_of_the_real_rows_at_tiny_m():
    """With the activation at the x loads, a 16-row dot would activate 16 padded rows per tile: up to
    act_fma_m rows the plan is an FMA tile of pow2(m) rows; above it, the plain linear's dot tiles."""
    cfg = {"linear": {**C.LINEAR_CONFIG, "min_bytes": 0}}
    for m in range(1, C.LINEAR_CONFIG["act_fma_m"] + 1):
        plan = C.linear_plan(m, 2048, 8192, 132, cfg, act=True)
        assert plan["USE_DOT"] == 0 and plan["BLOCK_M"] == C._pow2(m) >= m
        assert plan["BLOCK_K"] == C.LINEAR_CONFIG["act_fma"]["BLOCK_K"]
    m = C.LINEAR_CONFIG["act_fma_m"] + 1
    assert C.linear_plan(m, 2048, 8192, 132, cfg, act=True) == C.linear_plan(m, 2048, 8192, 132, cfg)
    assert C.linear_plan(1, 2048, 8192, 132, cfg)["USE_DOT"] == 1  # plain linear: the dot


@given(m=st.integers(1, 16), n=st.integers(1, 200_000), k=st.integers(1, 20_000), sms=st.integers(1, 200),
       act=st.booleans())
def test_linear_plan_splits_cover_k(m, n, k, sms, act):
    plan = C.linear_plan(m, n, k, sms, {"linear": {**C.LINEAR_CONFIG, "min_bytes": 0}}, act=act)
    assert plan is not None and plan["BLOCK_M"] >= m and plan["SPLIT_K"] >= 1
    assert plan["SPLIT_K"] == 1 or k // plan["SPLIT_K"] >= plan["BLOCK_K"]  # every split has a full tile


def test_a_captured_graph_is_not_kept_alive_by_the_backend():
    """CudaGraph wraps one capture; the backend must not retain it (it holds the graph's memory pool):
    after the LLM drops it, it is gone (a class-level cache once kept every graph of the process)."""
    import gc
    import weakref

    import accel_backend_cuda as C

    class Fake:  # stands in for torch.cuda.CUDAGraph and its outputs / pool (no GPU here)
        def replay(self):
            pass

    graph, outputs, pool = Fake(), Fake(), Fake()
    wrapped = C.CudaGraph(graph, outputs, pool)
    assert wrapped.replay() is outputs
    refs = [weakref.ref(o) for o in (graph, outputs, pool, wrapped)]
    del graph, outputs, pool, wrapped
    gc.collect()
    assert all(r() is None for r in refs)
