"""Token sampling with vLLM's semantics (V1 sampler order), batched over the rows that sample this step.

Order per row: min_tokens masks the stop tokens; repetition, frequency and presence penalties; greedy rows
take the argmax here. Sampled rows: divide by the temperature, min-p mask, top-k then top-p mask (top-p over
the top-k-masked distribution, at least one token kept), then an exponential race ``argmax(probs / q)``,
``q ~ Exp(1)``, drawn from the request's own generator when it has a seed (so its tokens do not depend on
what else is in the batch) and from the engine's generator otherwise. Logprobs come from the raw logits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from accel_models.runtime.outputs import Logprob, PositionLogprobs
from accel_models.runtime.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs of one request."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    #: token ids masked while fewer than ``params.min_tokens`` were generated (EOS ids and stop ids)
    min_tokens_mask_ids: list[int] = field(default_factory=list)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # per row; None where not requested
    sampled_logprob: list[float | None]  # per row: the sampled token's raw logprob, when logprobs requested


def argmax_rows(x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a 2-D tensor, the same indices (first maximum; a NaN counts as the maximum,
    the first NaN wins), faster for vocabulary-sized rows.

    CPU: torch's argmax does not vectorize (221 us for 16 x 32000 float32 on 2 cores, against 20 us for
    amax), so the row maximum is found per chunk of ``chunk`` columns with amax and the argmax runs only
    over the chunk that holds it (54 us). Other devices: one long row is a poorly parallel reduction for
    torch's argmax (27 us for 1 x 128256 float32 on an H100), so a ``max`` per chunk (values and first
    indices, every chunk in parallel) is followed by a ``max`` over the chunk maxima: see
    :func:`_argmax_two_level`."""
    R, V = x.shape
    if V < 16 * chunk or R == 0:
        return x.argmax(dim=-1)
    if x.device.type != "cpu":
        return _argmax_two_level(x, _device_chunk(R, V, chunk))
    main = V // chunk * chunk
    xm = x[:, :main].reshape(R, main // chunk, chunk)
    cmax = xm.amax(dim=-1)  # [R, chunks]; NaN propagates
    c = cmax.argmax(dim=-1)  # the first chunk whose maximum is the row's (or its first NaN's)
    idx = c * chunk + xm[torch.arange(R, device=x.device), c].argmax(dim=-1)
    return _with_tail(x, main, cmax.gather(1, c[:, None])[:, 0], idx)


@functools.lru_cache(maxsize=256)
def _device_chunk(rows: int, vocab: int, least: int = 256) -> int:
    """The two-level argmax's chunk: about 4096 chunk maxima in all (rows x chunks), at least ``least``
    columns, preferably a divisor of ``vocab`` (no ragged tail). H100, [R, 128256] bf16 (us, CUDA graph):
    R = 1: chunk 256 11.4, 2004 16.9; R = 16: 256 15.8, 1002 14.1; R = 64: 256 29.4, 2004 18.3
    (bench/cuda/check_argmax.py)."""
    target = max(least, -(-vocab * rows // 4096))
    for c in range(target, min(4 * target, vocab) + 1):
        if vocab % c == 0:
            return c
    return target


def _argmax_two_level(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmax_rows for accelerators: ``max(dim)`` over ``[R, chunks, chunk]`` gives each chunk's maximum
    and its first index (torch documents the first maximal index; a NaN is the maximum), then ``max(dim)``
    over the chunk maxima picks the first chunk holding the row's maximum: 3 small kernels when ``chunk``
    divides the row (256 divides Llama 3's 128256 and Llama 2's 32000)."""
    R, V = x.shape
    main = V // chunk * chunk
    vals, first = x[:, :main].reshape(R, main // chunk, chunk).max(dim=-1)
    mv, c = vals.max(dim=-1)
    idx = c * chunk + first.gather(1, c[:, None])[:, 0]
    return _with_tail(x, main, mv, idx)


def _with_tail(x: torch.Tensor, main: int, mv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Fold the columns after the last whole chunk into ``idx`` (the argmax of ``x[:, :main]``, whose
    values are ``mv``): a later column wins only if strictly greater, or a NaN where ``mv`` is none."""
    if main == x.shape[1]:
        return idx
    tail = x[:, main:]
    ti = tail.argmax(dim=-1)
    tv = tail.gather(1, ti[:, None])[:, 0]
    take = (tv > mv) | (tv.isnan() & ~mv.isnan())
    return torch.where(take, main + ti, idx)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """vLLM's penalties on ``logits`` [R, V] (float32), one row per entry of ``rows``; returns new logits.

    repetition: for tokens seen in the prompt or the output, ``l / p`` if ``l > 0`` else ``l * p``;
    frequency: ``l -= f * count_in_output``; presence: ``l -= p * (count_in_output > 0)``.
    """
    R, V = logits.shape
    dev = logits.device
    counts = torch.zeros((R, V), dtype=torch.float32, device=dev)
    seen = torch.zeros((R, V), dtype=torch.bool, device=dev)
    for i, r in enumerate(rows):
        if r.output_token_ids:
            ids = torch.tensor(r.output_token_ids, dtype=torch.int64, device=dev)
            counts[i].index_add_(0, ids, torch.ones(ids.shape[0], device=dev))
        if r.params.repetition_penalty != 1.0 and r.prompt_token_ids:
            seen[i, torch.tensor(r.prompt_token_ids, dtype=torch.int64, device=dev)] = True
    seen |= counts > 0
    rep = torch.tensor([r.params.repetition_penalty for r in rows], dtype=torch.float32, device=dev)[:, None]
    freq = torch.tensor([r.params.frequency_penalty for r in rows], dtype=torch.float32, device=dev)[:, None]
    pres = torch.tensor([r.params.presence_penalty for r in rows], dtype=torch.float32, device=dev)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - freq * counts - pres * (counts > 0).to(torch.float32)


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """True where a token is dropped: ``prob < min_p * max_prob`` (``logits`` already temperature-scaled)."""
    probs = torch.softmax(logits, dim=-1)
    return probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """True where a token is dropped (vLLM's ``apply_top_k_top_p``).

    top-k keeps tokens whose logit is at least the k-th largest (ties at the threshold kept); ``k >= V``
    keeps all. top-p, computed on the top-k-masked distribution, drops the tokens of the ascending sort
    whose cumulative probability is ``<= 1 - p``, always keeping the most likely one.
    """
    V = logits.shape[-1]
    logits_sort, idx = logits.sort(dim=-1, descending=False)
    drop = torch.zeros_like(logits_sort, dtype=torch.bool)
    if top_k is not None:
        k = top_k.clamp(1, V).to(torch.int64)
        kth = logits_sort.gather(1, (V - k)[:, None])
        drop |= logits_sort < kth
    if top_p is not None:
        probs_sort = torch.softmax(logits_sort.masked_fill(drop, float("-inf")), dim=-1)
        cum = probs_sort.cumsum(dim=-1)
        p_drop = cum <= 1 - top_p[:, None]
        p_drop[:, -1] = False
        drop |= p_drop
    return torch.zeros_like(drop).scatter_(1, idx, drop)


def position_logprobs(logprobs: torch.Tensor, token: int, n: int) -> tuple[PositionLogprobs, float]:
    """``token``'s logprob and rank (1 = most likely) plus the top-``n`` entries, from one row of
    log-probabilities ``[V]``; returns the dict (``token`` first) and ``token``'s logprob."""
    lp = logprobs
    tok_lp = lp[token]
    rank = int((lp > tok_lp).sum()) + 1
    out: PositionLogprobs = {token: Logprob(float(tok_lp), rank)}
    if n > 0:
        vals, ids = lp.topk(min(n, lp.shape[0]))
        for r, (v, i) in enumerate(zip(vals.tolist(), ids.tolist()), start=1):
            if i not in out:
                out[i] = Logprob(v, r)
    return out, float(tok_lp)


class Sampler:
    """Samples one token per row of ``logits`` [R, V] (float32)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        R = logits.shape[0]
        assert R == len(rows), (R, len(rows))
        raw = logits
        want_lp = [r.params.logprobs is not None for r in rows]
        # Fast path: every row greedy, nothing to mask or penalize.
        simple = all(
            r.params.greedy and r.params.repetition_penalty == 1.0 and not r.params.frequency_penalty
            and not r.params.presence_penalty and not (r.min_tokens_mask_ids and len(r.output_token_ids) < r.params.min_tokens)
            for r in rows
        )
        if simple:
            tokens = argmax_rows(logits).tolist()
        else:
            tokens = self._sample(logits, rows).tolist()
        lps: list[PositionLogprobs | None] = [None] * R
        sampled: list[float | None] = [None] * R
        if any(want_lp):
            raw_lp = torch.log_softmax(raw.float(), dim=-1)
            for i, r in enumerate(rows):
                if want_lp[i]:
                    lps[i], sampled[i] = position_logprobs(raw_lp[i], tokens[i], int(r.params.logprobs or 0))
        return SamplerOutput(token_ids=tokens, logprobs=lps, sampled_logprob=sampled)

    @staticmethod
    def on_device(params: SamplingParams, num_output_tokens: int) -> bool:
        """Whether a row's token can be sampled without the host's help (:meth:`sample_tensor`): no
        penalties (they read the output so far), no min_tokens mask still active, no logprobs."""
        return (params.logprobs is None and params.repetition_penalty == 1.0 and not params.frequency_penalty
                and not params.presence_penalty and num_output_tokens >= params.min_tokens)

    def sample_tensor(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The sampled token ids as a tensor on the logits' device, without waiting for the device (for
        rows :meth:`on_device` accepts): the same tokens :meth:`__call__` returns."""
        if all(r.params.greedy for r in rows):
            return argmax_rows(logits)
        return self._sample(logits, rows)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        dev = logits.device
        logits = logits.to(torch.float32).clone()
        for i, r in enumerate(rows):
            if r.min_tokens_mask_ids and len(r.output_token_ids) < r.params.min_tokens:
                logits[i, torch.tensor(r.min_tokens_mask_ids, dtype=torch.int64, device=dev)] = float("-inf")
        pen = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0 or r.params.frequency_penalty
               or r.params.presence_penalty]
        if pen:
            idx = torch.tensor(pen, dtype=torch.int64, device=dev)
            logits[idx] = apply_penalties(logits[idx], [rows[i] for i in pen])
        tokens = argmax_rows(logits)  # the greedy rows' answer
        rnd = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not rnd:
            return tokens
        idx = torch.tensor(rnd, dtype=torch.int64, device=dev)
        sub = [rows[i].params for i in rnd]
        x = logits[idx] / torch.tensor([p.temperature for p in sub], dtype=torch.float32, device=dev)[:, None]
        if any(p.min_p > 0 for p in sub):
            x = x.masked_fill(min_p_mask(x, torch.tensor([p.min_p for p in sub], device=dev)), float("-inf"))
        V = x.shape[-1]
        use_k = any(0 < p.top_k < V for p in sub)
        use_p = any(p.top_p < 1.0 for p in sub)
        if use_k or use_p:
            k = torch.tensor([p.top_k if p.top_k > 0 else V for p in sub], device=dev) if use_k else None
            tp = torch.tensor([p.top_p for p in sub], dtype=torch.float32, device=dev) if use_p else None
            x = x.masked_fill(top_k_top_p_mask(x, k, tp), float("-inf"))
        probs = torch.softmax(x, dim=-1)
        q = torch.empty_like(probs)
        seeded = [j for j, i in enumerate(rnd) if rows[i].generator is not None]
        if len(seeded) != len(rnd):
            q.exponential_(generator=self.generator)
        for j in seeded:
            q[j].exponential_(generator=rows[rnd[j]].generator)
        tokens[idx] = argmax_rows(probs.div_(q))
        return tokens
