"""Sampler masks and penalties against naive per-row implementations written here, and sampling
statistics against the softmax they should follow."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accel_models import SamplingParams
from accel_models.runtime.sampler import Sampler, SamplingRow, apply_penalties, min_p_mask, top_k_top_p_mask


def naive_top_k_top_p(row: list[float], k: int, p: float) -> set[int]:
    """Indices kept: top-k (ties at the k-th value kept), then the nucleus of the renormalized rest."""
    V = len(row)
    order = sorted(range(V), key=lambda i: row[i], reverse=True)
    kth = row[order[min(k, V) - 1]] if 0 < k < V else -math.inf
    kept = [i for i in order if row[i] >= kth]
    m = max(row[i] for i in kept)
    w = {i: math.exp(row[i] - m) for i in kept}
    z = sum(w.values())
    # ascending order: drop tokens while the cumulative mass from the bottom stays <= 1 - p
    asc = sorted(kept, key=lambda i: (row[i], i))
    out, cum = set(), 0.0
    for j, i in enumerate(asc):
        cum += w[i] / z
        if cum <= 1 - p and j != len(asc) - 1:
            continue
        out.add(i)
    return out


@given(st.integers(2, 40), st.integers(0, 45), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_top_k_top_p_mask_matches_naive(V, k, p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, V, generator=g, dtype=torch.float64) * 3
    drop = top_k_top_p_mask(logits, torch.tensor([k if k > 0 else V]), torch.tensor([p], dtype=torch.float64))
    kept = set((~drop[0]).nonzero().flatten().tolist())
    expected = naive_top_k_top_p(logits[0].tolist(), k, p)
    # float rounding may differ exactly at a boundary; allow only that
    if kept != expected:
        diff = kept ^ expected
        cum_vals = sorted(torch.softmax(logits[0], -1).tolist())
        assert len(diff) == 1 and any(abs(sum(cum_vals[: j + 1]) - (1 - p)) < 1e-9 for j in range(V)), (kept, expected)


@given(st.integers(2, 40), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_min_p_mask_matches_naive(V, min_p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, V, generator=g, dtype=torch.float64) * 2
    drop = min_p_mask(logits, torch.tensor([min_p], dtype=torch.float64))[0].tolist()
    probs = [math.exp(x) for x in logits[0].tolist()]
    z = sum(probs)
    probs = [x / z for x in probs]
    expected = [pr < min_p * max(probs) for pr in probs]
    assert drop == expected


def naive_penalties(row, prompt, output, rep, freq, pres):
    out = []
    for t, x in enumerate(row):
        if t in prompt or t in output:
            x = x / rep if x > 0 else x * rep
        c = output.count(t)
        x -= freq * c
        x -= pres * (c > 0)
        out.append(x)
    return out


@given(st.lists(st.integers(0, 19), max_size=6), st.lists(st.integers(0, 19), max_size=8),
       st.floats(0.5, 2.0), st.floats(-2, 2), st.floats(-2, 2), st.integers(0, 1000))
def test_penalties_match_naive(prompt, output, rep, freq, pres, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 20, generator=g)
    row = SamplingRow(SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres),
                      prompt, output)
    got = apply_penalties(logits, [row])[0].tolist()
    exp = naive_penalties(logits[0].tolist(), prompt, output, rep, freq, pres)
    assert got == pytest.approx(exp, rel=1e-5, abs=1e-5)


def test_sampling_follows_the_tempered_softmax():
    """20000 draws from a 6-token distribution: frequencies within 4 sigma of softmax(logits / T)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    T = 0.7
    n = 20000
    sampler = Sampler(torch.Generator().manual_seed(1))
    rows = [SamplingRow(SamplingParams(temperature=T), [1], []) for _ in range(n)]
    toks = torch.tensor(sampler(logits.expand(n, -1).clone(), rows).token_ids)
    freq = torch.bincount(toks, minlength=6).double() / n
    p = torch.softmax(logits.double() / T, -1)
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * sigma + 1e-4).all(), (freq, p)


def test_top_k_top_p_min_p_never_sample_masked_tokens():
    logits = torch.tensor([3.0, 2.9, 1.0, 0.5, 0.0, -1.0, -2.0, -5.0])
    n = 3000
    sampler = Sampler(torch.Generator().manual_seed(2))
    for params, allowed in [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.5), {0, 1}),
        (SamplingParams(min_p=0.2), {0, 1}),  # p2/p0 = e^-2 < 0.2
        (SamplingParams(top_k=3, top_p=0.99), {0, 1, 2}),
    ]:
        rows = [SamplingRow(params, [], []) for _ in range(n)]
        toks = set(sampler(logits.expand(n, -1).clone(), rows).token_ids)
        assert toks == allowed, (params, toks)


def test_greedy_and_min_tokens():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    rows = [SamplingRow(SamplingParams(temperature=0.0), [], []),
            SamplingRow(SamplingParams(temperature=0.0, min_tokens=2), [], [0], min_tokens_mask_ids=[1])]
    assert Sampler()(logits, rows).token_ids == [1, 2]


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(1, 50)
    mk = lambda seed: SamplingRow(SamplingParams(temperature=1.0, seed=seed), [], [],  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed))
    alone = [Sampler()(logits.clone(), [mk(7)]).token_ids[0] for _ in range(1)]
    seq_alone = []
    r = mk(7)
    for _ in range(20):
        seq_alone.append(Sampler()(logits.clone(), [r]).token_ids[0])
    r = mk(7)
    seq_batched = []
    for i in range(20):
        others = [mk(100 + i), SamplingRow(SamplingParams(temperature=1.0), [], [])]
        batch = torch.cat([torch.randn(1, 50), logits, torch.randn(1, 50)])
        seq_batched.append(Sampler()(batch, [others[0], r, others[1]]).token_ids[1])
    assert seq_alone == seq_batched and alone[0] == seq_alone[0]
    assert len(set(seq_alone)) > 1  # it is really sampling


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), cols=st.sampled_from([4096, 4097, 8192 + 77, 32000]), data=st.data())
def test_argmax_rows_is_torch_argmax(rows, cols, data):
    """The chunked argmax (both paths) gives torch.argmax's indices: ties (first wins), NaN (first NaN wins), -inf
    rows, maxima in the ragged tail."""
    from accel_models.runtime.sampler import _argmax_two_level, _device_chunk, argmax_rows

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = torch.randint(-3, 3, (rows, cols), generator=g).float()  # few distinct values: many ties
    for r in range(rows):
        kind = data.draw(st.sampled_from(["plain", "nan", "two_nans", "neg_inf", "tail_max", "tail_tie",
                                          "tail_nan"]))
        if kind == "nan":
            x[r, data.draw(st.integers(0, cols - 1))] = float("nan")
        elif kind == "two_nans":
            x[r, data.draw(st.integers(0, cols // 2))] = float("nan")
            x[r, data.draw(st.integers(cols // 2, cols - 1))] = float("nan")
        elif kind == "neg_inf":
            x[r] = float("-inf")
        elif kind == "tail_max":
            x[r, -1] = 10.0
        elif kind == "tail_nan":
            x[r, -1] = float("nan")
        elif kind == "tail_tie":
            x[r, 5] = 10.0
            x[r, -1] = 10.0
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()
    assert argmax_rows(x.to(torch.bfloat16)).tolist() == x.to(torch.bfloat16).argmax(dim=-1).tolist()
    # the accelerators' two-level path, run here on the CPU (its max(dim) promises the same first index)
    assert _argmax_two_level(x, 256).tolist() == x.argmax(dim=-1).tolist()
    assert _argmax_two_level(x.to(torch.bfloat16), 256).tolist() == x.to(torch.bfloat16).argmax(dim=-1).tolist()
    chunk = _device_chunk(rows, cols)  # the chunk a GPU would take for this shape
    assert _argmax_two_level(x, chunk).tolist() == x.argmax(dim=-1).tolist()


def test_device_chunk_prefers_divisors_and_about_4096_partial_maxima():
    from accel_models.runtime.sampler import _device_chunk

    assert [_device_chunk(r, 128256) for r in (1, 16, 64)] == [256, 501, 2004]  # all divide 128256
    assert _device_chunk(1, 32000) == 256 and _device_chunk(64, 32000) == 500
    assert _device_chunk(3, 4099) == 256  # 4099 is prime: no divisor, the ragged tail path
