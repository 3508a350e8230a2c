"""The CPU backend (backends/cpu): oneDNN-packed linear layers and its own KV-cache group.

Numbers are checked against independent implementations: a float64 product for linear, the reference
backend's attention in float64 on the same keys and values for the decode path, transformers through the
kit's tiny models, and the reference backend's greedy tokens end to end.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import accel_backend_cpu as cpu
from accel_backend_cpu import native
import accel_models
from accel_models.testing import run_conformance
from accel_models.testing.models import check_model


@pytest.fixture(scope="module")
def ops():
    table = accel_models.resolve_ops("cpu")
    assert table.providers["linear"] == "cpu" and table.providers["paged_attention"] == "cpu"
    return table


@pytest.fixture
def pack_all(monkeypatch):
    """Pack weights of every size (the backend leaves small ones to F.linear), so small tests reach the
    packed path."""
    monkeypatch.setattr(cpu, "_MIN_PACKED_NUMEL", 1)


@pytest.fixture(scope="module")
def ref():
    return accel_models.resolve_ops("reference")


def test_registered_usable_and_above_the_reference():
    info = cpu.accel_backend_info()
    assert info.available and info.device_type == "cpu" and info.priority > -100


def test_kit_passes_on_the_cpu_backend():
    report = run_conformance("cpu", quick=True, max_examples=8, dtypes=(torch.float32, torch.bfloat16))
    assert report.passed, [(r.op, r.status, r.message) for r in report.ops if r.status != "pass"]
    native = {r.op for r in report.ops if r.native}
    assert {"linear", "prepare_linear", "paged_attention", "write_kv_cache"} <= native
    models = [check_model(m, "cpu", dtype=torch.float32, device="cpu")
              for m in ("llama", "mixtral", "deepseek_v2", "deepseek_v3")]
    assert all(m["status"] == "pass" for m in models), models


# ----------------------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------------------


@given(m=st.sampled_from([1, 3, 16, 70]), n=st.sampled_from([8, 96, 1000]), k=st.sampled_from([16, 64, 512]),
       bias=st.booleans(), mode=st.sampled_from(["native", "onednn"]), seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_packed_linear_matches_a_float64_product(ops, pack_all, monkeypatch, m, n, k, bias, mode, seed):
    monkeypatch.setenv("ACCEL_CPU_LINEAR", mode)  # native panels (the default) or oneDNN's packed weight
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) if bias else None
    prepared = ops.prepare_linear(weight=w)
    assert isinstance(prepared, cpu.PanelLinear if mode == "native" else cpu.PackedLinear)  # float32 always packs
    assert mode == "native" or not isinstance(prepared, cpu.PanelLinear)
    out = ops.linear(x=x, weight=w, bias=b, prepared=prepared)
    expect = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.fixture
def gemv_calls(monkeypatch):
    """Records, per linear call, whether the native GEMV computed it."""
    calls = []
    real = cpu._gemv

    def spy(x, weight, bias):
        out = real(x, weight, bias)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu, "_gemv", spy)
    return calls


@given(m=st.sampled_from([1, 2]), n=st.sampled_from([1, 5, 96, 1000]),
       k=st.sampled_from([1, 15, 16, 31, 32, 33, 64, 100, 512]), bias=st.booleans(), packed=st.booleans(),
       layout=st.sampled_from(["plain", "strided_x", "wide_weight", "3d"]), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_decode_rows_take_the_native_gemv_and_match_a_float64_product(ops, gemv_calls, monkeypatch, m, n, k, bias,
                                                                       packed, layout, seed):
    """One or two float32 rows: csrc/gemv.c (each weight row read once for every row of x; 32-wide main loop,
    a scalar tail for k not a multiple of 32), packed or not, strided x rows, a weight row stride > k."""
    monkeypatch.setattr(cpu, "_MIN_PACKED_NUMEL", 1 if packed else 1 << 62)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k, generator=g)[:, ::2] if layout == "strided_x" else torch.randn(m, k, generator=g)
    if layout == "3d":
        x = x.view(m, 1, k)
    w = torch.randn(n, k + 3, generator=g)[:, :k] if layout == "wide_weight" else torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    prepared = ops.prepare_linear(weight=w)
    gemv_calls.clear()
    out = ops.linear(x=x, weight=w, bias=b, prepared=prepared)
    assert gemv_calls == [True] and out.shape == (*x.shape[:-1], n)
    expect = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)


def test_the_gemv_propagates_nan_and_inf_and_leaves_other_shapes_to_the_gemm(ops, gemv_calls, pack_all, monkeypatch):
    w = torch.randn(40, 70)
    prepared = ops.prepare_linear(weight=w)
    x = torch.randn(2, 70)
    x[0, 69] = float("nan")  # in the scalar tail
    x[1, 3] = float("inf")  # in the vector loop
    out = ops.linear(x=x, weight=w, bias=None, prepared=prepared)
    assert out[0].isnan().all() and not out[1].isfinite().any() and gemv_calls == [True]
    gemv_calls.clear()
    ops.linear(x=torch.randn(3, 70), weight=w, bias=None, prepared=prepared)  # 3 rows: the panel GEMM
    monkeypatch.setenv("ACCEL_CPU_LINEAR", "onednn")
    ops.linear(x=torch.randn(1, 70), weight=w, bias=None, prepared=prepared)
    assert gemv_calls == [False, False]
    monkeypatch.setenv("ACCEL_CPU_LINEAR", "fast")
    with pytest.raises(ValueError, match="ACCEL_CPU_LINEAR"):
        ops.prepare_linear(weight=w)
    monkeypatch.delenv("ACCEL_CPU_LINEAR")
    out = ops.linear(x=torch.randn(1, 70, dtype=torch.float64), weight=w.double(), bias=None, prepared=None)
    assert gemv_calls == [False, False] and out.dtype == torch.float64  # float64: F.linear, never the GEMV


@given(m=st.sampled_from([3, 5, 7, 8, 9, 12, 15, 16, 17, 24, 33, 130]),
       n=st.sampled_from([1, 15, 16, 17, 33, 47, 48, 49, 100, 1000]),
       k=st.sampled_from([1, 17, 64, 512]), bias=st.booleans(), layout=st.sampled_from(["plain", "strided_x", "3d"]),
       seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_three_rows_and_more_take_the_panel_gemm_and_match_a_float64_product(ops, pack_all, monkeypatch, m, n, k,
                                                                             bias, layout, seed):
    """csrc/gemm.c: 3-8 rows on groups of three 16-column panels (and the last group of 1-2, its last panel
    partial), 9+ rows in k-major tiles of 16 (and the 1-15 row remainders), bias added per column, strided
    rows of x."""
    calls = []
    real = cpu._gemm_panels
    monkeypatch.setattr(cpu, "_gemm_panels", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k, generator=g)[:, ::2] if layout == "strided_x" else torch.randn(m, k, generator=g)
    if layout == "3d":
        x = x.view(m, 1, k)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) if bias else None
    prepared = ops.prepare_linear(weight=w)
    assert isinstance(prepared, cpu.PanelLinear)
    out = ops.linear(x=x, weight=w, bias=b, prepared=prepared)
    assert calls == [1] and out.shape == (*x.shape[:-1], n)
    expect = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [16, 49, 100])
def test_every_row_count_of_the_panel_gemm_matches_a_float64_product_and_writes_only_its_output(pack_all, n):
    """Each row count 3..40 takes its own compiled tile (3-8: the 8-row tiles; 9+: 16-row tiles and every
    1-15 row remainder); n=49 ends in a group of one panel with one column, n=100 in a group of one partial
    panel, n=16 is one full panel. The kernel writes into a wider, taller NaN-filled buffer: everything
    outside [m, n] must stay NaN."""
    lib = native.kernels()
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, 19, generator=g)
    b = torch.randn(n, generator=g)
    prepared = cpu.accel_prepare_linear(weight=w)
    assert isinstance(prepared, cpu.PanelLinear)
    for m in range(3, 41):
        x = torch.randn(m, 19, generator=g)
        buf = torch.full((m + 2, n + 5), float("nan"))
        rc = lib.accel_gemm_panels_f32(x.data_ptr(), 19, prepared.packed.data_ptr(), b.data_ptr(), buf.data_ptr(),
                                       n + 5, m, n, 19, 2)
        expect = x.double() @ w.double().t() + b.double()
        assert rc == 0
        torch.testing.assert_close(buf[:m, :n].double(), expect, rtol=1e-5, atol=1e-5, msg=f"{m} rows")
        assert buf[:, n:].isnan().all() and buf[m:].isnan().all(), f"{m} rows: a write outside the output"


def _cpu_has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def test_the_kernels_are_built_for_this_cpus_vector_width():
    """gemm.c / gemv.c pick their tiles from the compiler's target macros (-march=native): 16-column panels
    with AVX-512, 6-column panels (16x6 / 8x12 tiles on 8-wide ymm registers) otherwise."""
    lib = native.kernels()
    if lib is None:
        pytest.skip("no native kernels here")
    width, isa = int(lib.accel_panel_width()), lib.accel_gemm_isa().decode()
    if _cpu_has_avx512f():
        assert (width, isa.split(":")[0]) == (16, "avx512")
    elif os.uname().machine == "x86_64":
        assert (width, isa.split(":")[0]) == (6, "avx2")
    assert int(lib.accel_panels_numel(width + 1, 3)) == 2 * width * 3  # zero-padded to whole panels


@pytest.mark.parametrize("n", [1, 5, 6, 7, 11, 12, 13, 18, 19, 31, 47, 48, 49])
@pytest.mark.parametrize("k", [7, 512])
def test_every_tile_remainder_of_either_isa_matches_a_float64_product(pack_all, n, k):
    """Column counts around both builds' panels (AVX-512: 16 columns in groups of 3; AVX2: 6 columns in pairs,
    16-row tiles each on one panel) and row counts around both row tiles, with and without a 1-8 row
    remainder; at k = 512 the AVX2 build runs its x tiles in blocks of 5 (rows 80, 100, 130 span 2 blocks).
    Every call goes into a NaN-filled buffer wider and taller than the output: whatever lies outside it
    must stay NaN."""
    lib = native.kernels()
    g = torch.Generator().manual_seed(1000 * n + k)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g)
    prepared = cpu.accel_prepare_linear(weight=w)
    assert isinstance(prepared, cpu.PanelLinear)
    for m in (1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 41, 80, 100, 130):
        x = torch.randn(m, k, generator=g)
        for bias in (b, None):
            buf = torch.full((m + 3, n + 7), float("nan"))
            rc = lib.accel_gemm_panels_f32(x.data_ptr(), k, prepared.packed.data_ptr(),
                                           None if bias is None else bias.data_ptr(), buf.data_ptr(), n + 7, m, n, k,
                                           2)
            expect = x.double() @ w.double().t() + (0 if bias is None else bias.double())
            assert rc == 0
            torch.testing.assert_close(buf[:m, :n].double(), expect, rtol=1e-5, atol=1e-5, msg=f"{m} rows")
            assert buf[:, n:].isnan().all() and buf[m:].isnan().all(), f"{m} rows: a write outside the output"


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_the_gemv_at_each_row_count_and_k_tail_matches_a_float64_product(m):
    """csrc/gemv.c directly (the backend sends it 1-2 rows; it takes up to 4): on AVX2, 1-2 rows run a
    32-wide k loop on four 8-wide accumulators, 3-4 rows a 16-wide one on two; every k tail. Strided x and
    output rows, into a NaN-filled buffer."""
    lib = native.kernels()
    g = torch.Generator().manual_seed(m)
    for k in (1, 7, 8, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 100):
        n = 37
        x = torch.randn(m, k + 5, generator=g)
        w = torch.randn(n, k + 2, generator=g)[:, :k]
        b = torch.randn(n, generator=g)
        buf = torch.full((m + 1, n + 4), float("nan"))
        rc = lib.accel_gemv_f32(x.data_ptr(), k + 5, w.data_ptr(), k + 2, b.data_ptr(), buf.data_ptr(), n + 4, m, n,
                                k, 2)
        expect = x[:, :k].double() @ w.double().t() + b.double()
        assert rc == 0
        torch.testing.assert_close(buf[:m, :n].double(), expect, rtol=1e-5, atol=1e-5, msg=f"k={k}")
        assert buf[:, n:].isnan().all() and buf[m:].isnan().all()


def test_the_panel_gemm_propagates_nan_and_inf_per_row_and_column(ops, pack_all):
    w = torch.randn(100, 64)
    w[60, 5] = float("inf")  # column 60 (the fourth panel, in the second group of 3) meets an inf weight
    prepared = ops.prepare_linear(weight=w)
    x = torch.randn(11, 64)
    x[9, 10] = float("nan")  # row 9 (of the 16-row tile; rows 11-15 zero-padded) meets a NaN input
    out = ops.linear(x=x, weight=w, bias=None, prepared=prepared)
    expect = x.double() @ w.double().t()
    assert out[9].isnan().all()
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert (out[:, 60].isinf() | out[:, 60].isnan()).all()


def test_a_changed_weight_never_meets_its_stale_packed_copy(ops, pack_all):
    w = torch.randn(64, 32)
    x = torch.randn(4, 32)
    prepared = ops.prepare_linear(weight=w)
    assert isinstance(prepared, cpu.PackedLinear)
    with torch.no_grad():
        w.mul_(2)  # an in-place change bumps the version counter: the packed copy is no longer used
    torch.testing.assert_close(ops.linear(x=x, weight=w, bias=None, prepared=prepared), x @ w.t())
    other = torch.randn(64, 32)  # a different tensor of the same shape
    torch.testing.assert_close(ops.linear(x=x, weight=other, bias=None, prepared=prepared), x @ other.t())


def test_layers_drop_the_packed_copy_when_weights_are_reloaded(tmp_path, pack_all):
    """A linear layer prepared after loading, then loaded again through its weight_loader: its output
    follows the new weight (no stale packed copy), and preparing again packs the new weight."""
    from accel_models.context import BuildContext, ParallelGroup, build_context
    from accel_models.layers.linear import RowParallelLinear

    ctx = BuildContext(ops=accel_models.resolve_ops("cpu"), tp_group=ParallelGroup(), params_dtype=torch.float32,
                       device=torch.device("cpu"))
    with build_context(ctx):
        layer = RowParallelLinear(32, 48, bias=False, prefix="o_proj")
    w1, w2, x = torch.randn(48, 32), torch.randn(48, 32), torch.randn(3, 32)
    layer.weight_loader(layer.weight, w1)
    layer.process_weights_after_loading()
    assert isinstance(layer.linear_prepared, cpu.PackedLinear)
    torch.testing.assert_close(layer(x)[0], x @ w1.t())
    layer.weight_loader(layer.weight, w2)  # writes through param.data: the version counter does not move
    assert layer.linear_prepared is None
    torch.testing.assert_close(layer(x)[0], x @ w2.t())
    layer.process_weights_after_loading()
    torch.testing.assert_close(layer(x)[0], x @ w2.t())


def test_packing_can_be_turned_off_and_other_dtypes_and_small_weights_are_not_packed(ops, monkeypatch):
    assert ops.prepare_linear(weight=torch.randn(8, 8)) is None  # below the size where packing pays
    assert isinstance(ops.prepare_linear(weight=torch.randn(512, 512)), cpu.PackedLinear)
    monkeypatch.setattr(cpu, "_MIN_PACKED_NUMEL", 1)
    assert ops.prepare_linear(weight=torch.randn(8, 8, dtype=torch.float64)) is None
    monkeypatch.setenv("ACCEL_CPU_PACK", "0")
    assert ops.prepare_linear(weight=torch.randn(8, 8)) is None


@pytest.mark.parametrize(("kwargs", "arg"), [
    (dict(x=torch.randn(2, 5), weight=torch.randn(3, 4), bias=None, prepared=None), "weight"),
    (dict(x=torch.randn(2, 4), weight=torch.randn(3, 4), bias=torch.randn(2), prepared=None), "bias"),
    (dict(x=torch.ones(2, 4, dtype=torch.int32), weight=torch.randn(3, 4), bias=None, prepared=None), "x"),
])
def test_bad_linear_input_is_a_value_error_naming_it(ops, pack_all, kwargs, arg):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        ops.linear(**kwargs)
    # the same with a packed weight (the fast path checks less and must hand bad input to the full check)
    prepared = ops.prepare_linear(weight=kwargs["weight"])
    assert isinstance(prepared, cpu.PackedLinear)
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        ops.linear(**{**kwargs, "prepared": prepared})


# ----------------------------------------------------------------------------------------------------
# KV-cache group: decode path against the reference in float64 on the same keys and values
# ----------------------------------------------------------------------------------------------------


def _fill(ops, ref, seq_lens, *, kv_heads, head_size, block_size, dtype, gen):
    """The same random keys/values written into a cpu-backend cache (``dtype``) and a reference cache
    (float64); returns both caches and the block table."""
    batch = len(seq_lens)
    per_seq = -(-max(seq_lens) // block_size)
    num_blocks = batch * per_seq + 3
    perm = torch.randperm(num_blocks, generator=gen)[: batch * per_seq].view(batch, per_seq).to(torch.int32)
    c = ops.allocate_kv_cache(num_blocks=num_blocks, block_size=block_size, num_kv_heads=kv_heads,
                              head_size=head_size, dtype=dtype, device=torch.device("cpu"))
    r = ref.allocate_kv_cache(num_blocks=num_blocks, block_size=block_size, num_kv_heads=kv_heads,
                              head_size=head_size, dtype=torch.float64, device=torch.device("cpu"))
    for b, n in enumerate(seq_lens):
        pos = torch.arange(n)
        slots = (perm[b, pos // block_size].long() * block_size + pos % block_size)
        k = torch.randn(n, kv_heads, head_size, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, head_size, generator=gen).to(dtype)
        ops.write_kv_cache(key=k, value=v, kv_cache=c, slot_mapping=slots)
        ref.write_kv_cache(key=k.double(), value=v.double(), kv_cache=r, slot_mapping=slots)
    return c, r, perm


@given(seq_lens=st.lists(st.integers(1, 70), min_size=1, max_size=5), group=st.sampled_from([1, 4]),
       block_size=st.sampled_from([16, 1, 32]), window=st.sampled_from([None, 8]), cap=st.sampled_from([None, 5.0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_decode_attention_matches_the_float64_reference(ops, ref, seq_lens, group, block_size, window, cap, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    kv_heads, head_size = 2, 32
    c, r, table = _fill(ops, ref, seq_lens, kv_heads=kv_heads, head_size=head_size, block_size=block_size,
                        dtype=dtype, gen=gen)
    q = torch.randn(len(seq_lens), kv_heads * group, head_size, generator=gen).to(dtype)
    args = dict(block_table=table, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32), max_query_len=1,
                max_seq_len=max(seq_lens), scale=head_size**-0.5, sliding_window=window, logits_soft_cap=cap)
    out = ops.paged_attention(query=q, kv_cache=c, **args)
    expect = ref.paged_attention(query=q.double(), kv_cache=r, **args)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expect, rtol=tol, atol=tol)


def test_the_native_kernel_is_built_here_and_agrees_with_the_torch_path(ops, monkeypatch):
    """CI has a C compiler: the native decode kernel must be the one under test above. The pure-torch path
    (no compiler, ACCEL_CPU_NATIVE=0) gives the same numbers."""
    import shutil

    from accel_backend_cpu import native

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler here: the backend runs its pure-torch decode path")
    assert native.kernels() is not None
    gen = torch.Generator().manual_seed(5)
    seq_lens = [3, 40, 17, 1]
    c, _, table = _fill(ops, ops, seq_lens, kv_heads=2, head_size=64, block_size=16, dtype=torch.float32, gen=gen)
    q = torch.randn(4, 8, 64, generator=gen)
    args = dict(query=q, kv_cache=c, block_table=table, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                query_start_loc=torch.arange(5, dtype=torch.int32), max_query_len=1, max_seq_len=40, scale=0.125,
                sliding_window=None, logits_soft_cap=None)
    fast = ops.paged_attention(**args)
    monkeypatch.setattr(native, "kernels", lambda: None)
    torch.testing.assert_close(ops.paged_attention(**args), fast, rtol=1e-5, atol=1e-6)


def test_a_block_id_outside_the_cache_is_an_error_not_a_crash(ops):
    c = ops.allocate_kv_cache(num_blocks=4, block_size=16, num_kv_heads=1, head_size=16, dtype=torch.float32,
                              device=torch.device("cpu"))
    table = torch.tensor([[0, 1], [2, 99]], dtype=torch.int32)  # sequence 1's second block does not exist
    with pytest.raises(ValueError, match="block_table"):
        ops.paged_attention(query=torch.randn(2, 2, 16), kv_cache=c, block_table=table,
                            seq_lens=torch.tensor([20, 20], dtype=torch.int32),
                            query_start_loc=torch.arange(3, dtype=torch.int32), max_query_len=1, max_seq_len=20,
                            scale=0.25, sliding_window=None, logits_soft_cap=None)


def test_a_nan_in_another_sequences_slot_does_not_leak(ops, ref):
    """Sequence 1's block holds NaN/inf past its context (a slot an earlier request wrote): the poisoned
    output is detected and computed again with the slots outside each context zeroed, as the reference does."""
    gen = torch.Generator().manual_seed(0)
    seq_lens = [20, 5]
    c, r, table = _fill(ops, ref, seq_lens, kv_heads=1, head_size=16, block_size=16, dtype=torch.float32, gen=gen)
    poison = int(table[1, 0]) * 16 + 9  # slot 9 of sequence 1's only block: outside its 5-token context
    ops.write_kv_cache(key=torch.full((1, 1, 16), float("nan")), value=torch.full((1, 1, 16), float("inf")),
                       kv_cache=c, slot_mapping=torch.tensor([poison]))
    q = torch.randn(2, 2, 16, generator=gen)
    args = dict(block_table=table, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                query_start_loc=torch.arange(3, dtype=torch.int32), max_query_len=1, max_seq_len=20, scale=0.25,
                sliding_window=None, logits_soft_cap=None)
    out = ops.paged_attention(query=q, kv_cache=c, **args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref.paged_attention(query=q.double(), kv_cache=r, **args), rtol=1e-5, atol=1e-5)


def test_write_kv_cache_skips_padding_and_rejects_slots_past_the_cache(ops):
    c = ops.allocate_kv_cache(num_blocks=2, block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32,
                              device=torch.device("cpu"))
    k = torch.ones(2, 1, 8)
    ops.write_kv_cache(key=k, value=k, kv_cache=c, slot_mapping=torch.tensor([-1, 17]))
    assert c.sum() == 16 and c[0, 1, 0, 1].sum() == 8  # only slot 17 (block 1, offset 1), keys and values
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.write_kv_cache(key=k, value=k, kv_cache=c, slot_mapping=torch.tensor([0, 32]))
    with pytest.raises(ValueError, match="kv_cache"):
        ops.write_kv_cache(key=k, value=k, kv_cache=torch.zeros(2, 32, 1, 8), slot_mapping=torch.tensor([0, 1]))


def test_greedy_generation_equals_the_reference_backend(tmp_path):
    from accel_models import LLM, SamplingParams
    from accel_models.runtime.demo import llama_config, write_checkpoint

    path = write_checkpoint(tmp_path / "m", llama_config(300, hidden_size=64, num_layers=2, num_heads=4,
                                                          num_kv_heads=2, intermediate_size=96), seed=3,
                            tokenizer=False)
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40)), [3]]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = {}
    for backend in ("cpu", "reference"):
        with LLM(path, backend=backend, max_num_seqs=4, kv_cache_memory=8 << 20) as llm:
            outs[backend] = [r.outputs[0].token_ids for r in llm.generate(prompts, sp)]
    assert outs["cpu"] == outs["reference"]


def test_thread_pinning_leaves_the_calling_thread_and_its_children_free():
    """Pinning the OpenMP workers must not pin the caller: a process it starts later inherits its mask."""
    import os
    import subprocess
    import sys
    import threading

    from accel_backend_cpu import native

    if native.kernels() is None:
        pytest.skip("no native kernels here")
    before = os.sched_getaffinity(0)
    result = {}

    def run():  # a fresh thread: binding happens once per calling thread
        result["pinned"] = native.bind_threads()
        result["mask"] = os.sched_getaffinity(0)
        out = subprocess.run([sys.executable, "-c", "import os; print(len(os.sched_getaffinity(0)))"],
                             capture_output=True, text=True, check=True)
        result["child"] = int(out.stdout)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert result["mask"] == before and result["child"] == len(before)
    assert result["pinned"] == (torch.get_num_threads() - 1 if torch.get_num_threads() <= len(before) else 0)
