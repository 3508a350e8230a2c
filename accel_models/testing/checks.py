"""One check per op: build the case's tensors, run the backend's op and the reference in float64, compare.

Every check returns a :class:`CheckResult` (the worst error over the op's outputs as a ratio to its
tolerance, and what was compared); it never trusts numbers the backend produced for anything but the
comparison. Inputs are drawn in float64, rounded to the tested dtype, and the reference sees the same
rounded values, so the comparison measures the backend's arithmetic, not input rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from accel_models.backends import OpTable
from accel_models.testing.tolerances import error_ratio, tolerance


@dataclass
class CheckResult:
    ratio: float  # worst |out - ref| / tol over every compared output (<= 1 passes)
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _pair(x64: torch.Tensor, dtype: torch.dtype, device: Any, noncontig: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input for the backend in ``dtype`` on ``device``, the same rounded values in float64 on CPU)."""
    low = x64.to(dtype)
    ref = low.to(torch.float64)
    if noncontig and low.dim() >= 1:
        # the same values as a strided view into a wider buffer
        wide = torch.zeros(*low.shape[:-1], low.shape[-1] * 2 + 1, dtype=dtype)
        wide[..., 1 : low.shape[-1] * 2 + 1 : 2] = low
        low = wide[..., 1::2][..., : x64.shape[-1]]
        assert not low.is_contiguous() or low.numel() <= 1
    return low.to(device), ref


def _worst(*pairs: tuple[str, torch.Tensor, torch.Tensor], op: str, dtype: torch.dtype) -> CheckResult:
    rtol, atol = tolerance(op, dtype)
    worst, detail = 0.0, ""
    for name, out, ref in pairs:
        r = error_ratio(out, ref, rtol, atol)
        if r > worst or not detail:
            worst = max(worst, r)
            diff = (out.detach().to("cpu", torch.float64) - ref).abs().max().item() if out.shape == ref.shape else float("nan")
            detail = f"{name}: max abs err {diff:.3g} (rtol {rtol:g}, atol {atol:g})" if out.shape == ref.shape else \
                f"{name}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    return CheckResult(worst, detail)


def _unchanged(name: str, before: torch.Tensor, after: torch.Tensor) -> CheckResult | None:
    if not torch.equal(before.cpu(), after.cpu()):
        return CheckResult(float("inf"), f"the op modified its input {name!r}, which the contract forbids")
    return None


# ----------------------------------------------------------------------------------------------------


def check_rms_norm(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    g = _gen(case["seed"])
    shape = (*case["leading"], case["hidden"])
    x, x64 = _pair(_rand(g, *shape), dtype, device, case["noncontig"])
    w, w64 = _pair(1 + 0.1 * _rand(g, case["hidden"]), dtype, device)
    x_before = x.clone()
    out = ops.rms_norm(x=x, weight=w, eps=case["eps"])
    bad = _unchanged("x", x_before, x)
    if bad:
        return bad
    return _worst(("out", out, ref.rms_norm(x=x64, weight=w64, eps=case["eps"])), op="rms_norm", dtype=dtype)


def check_fused_add_rms_norm(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    g = _gen(case["seed"])
    shape = (*case["leading"], case["hidden"])
    x, x64 = _pair(_rand(g, *shape), dtype, device, case["noncontig"])
    r, r64 = _pair(_rand(g, *shape), dtype, device)
    w, w64 = _pair(1 + 0.1 * _rand(g, case["hidden"]), dtype, device)
    out, res = ops.fused_add_rms_norm(x=x, residual=r, weight=w, eps=case["eps"])
    # residual_out is rounded to the dtype once (x + residual in the dtype); compare out against the
    # normalization of that rounded sum, as the contract specifies.
    res64 = (x64 + r64).to(dtype).to(torch.float64)
    ref_out = ref.rms_norm(x=res64, weight=w64, eps=case["eps"])
    return _worst(("residual_out", res, x64 + r64), ("out", out, ref_out), op="fused_add_rms_norm", dtype=dtype)


def _check_act(op: str, case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    g = _gen(case["seed"])
    x, x64 = _pair(_rand(g, case["tokens"], 2 * case["d"]), dtype, device, case["noncontig"])
    before = x.clone()
    if op == "silu_and_mul":
        out, expect = ops.silu_and_mul(x=x), ref.silu_and_mul(x=x64)
    else:
        a = case["approximate"]
        out, expect = ops.gelu_and_mul(x=x, approximate=a), ref.gelu_and_mul(x=x64, approximate=a)
    return _unchanged("x", before, x) or _worst(("out", out, expect), op=op, dtype=dtype)


def check_silu_and_mul(case, ops, ref, dtype, device):
    return _check_act("silu_and_mul", case, ops, ref, dtype, device)


def check_gelu_and_mul(case, ops, ref, dtype, device):
    return _check_act("gelu_and_mul", case, ops, ref, dtype, device)


def rope_cache(max_position: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """A plain RoPE cos|sin cache in float64: ``[max_position, rotary_dim]``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def check_rotary_embedding(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    g = _gen(case["seed"])
    t, h, hk, d = case["tokens"], case["num_heads"], case["num_kv_heads"], case["head_size"]
    pos = torch.randint(0, case["max_position"], (t,), generator=g, dtype=torch.int64)
    qshape = (t, h, d) if case["three_d"] else (t, h * d)
    kshape = (t, hk, d) if case["three_d"] else (t, hk * d)
    q, q64 = _pair(_rand(g, *qshape), dtype, device)
    k, k64 = _pair(_rand(g, *kshape), dtype, device) if case["with_key"] else (None, None)
    cache64 = rope_cache(case["max_position"], case["rotary_dim"])
    cache = cache64.to(torch.float32).to(device)
    args = dict(head_size=d, rotary_dim=case["rotary_dim"], is_neox=case["is_neox"])
    qo, ko = ops.rotary_embedding(positions=pos.to(device), query=q, key=k, cos_sin_cache=cache, **args)
    # The contract casts cos/sin to the query's dtype before the products: give the reference those values.
    cache_ref = cache.cpu().to(dtype).to(torch.float64)
    qr, kr = ref.rotary_embedding(positions=pos, query=q64, key=k64, cos_sin_cache=cache_ref, **args)
    pairs = [("query", qo, qr)]
    if case["with_key"]:
        if ko is None:
            return CheckResult(float("inf"), "key_out is None although a key was given")
        pairs.append(("key", ko, kr))
    elif ko is not None:
        return CheckResult(float("inf"), "key_out must be None when key is None")
    return _worst(*pairs, op="rotary_embedding", dtype=dtype)


def check_paged_attention(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    """write_kv_cache + paged_attention on the backend's own cache layout, against the reference in float64.

    Each sequence's earlier context is written in one call and its new tokens in a second one (as a
    runtime does across steps); block ids are shuffled so block tables are not the identity.
    """
    g = _gen(case["seed"])
    seqs, bs = case["seqs"], case["block_size"]
    h, hk, d = case["num_heads"], case["num_kv_heads"], case["head_size"]
    blocks_per_seq = [(ctx + bs - 1) // bs for ctx, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(blocks_per_seq)
    block_table = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(blocks_per_seq):
        block_table[b, :n] = perm[nxt : nxt + n].to(torch.int32)
        nxt += n

    def slots(b: int, start: int, end: int) -> torch.Tensor:
        p = torch.arange(start, end)
        return (block_table[b].long()[p // bs] * bs + p % bs).to(torch.int64)

    ctx_k = [_rand(g, ctx, hk, d) for ctx, _ in seqs]
    ctx_v = [_rand(g, ctx, hk, d) for ctx, _ in seqs]
    q_all = _rand(g, sum(q for _, q in seqs), h, d)

    layout = ops.kv_cache_layout(num_kv_heads=hk, head_size=d, dtype=dtype)
    if bs not in layout.block_sizes:
        return CheckResult(float("inf"), f"block size {bs} drawn from the layout's block_sizes {layout.block_sizes} was refused")
    cache = ops.allocate_kv_cache(num_blocks=num_blocks, block_size=bs, num_kv_heads=hk, head_size=d, dtype=dtype,
                                  device=torch.device(device))
    ref_cache = ref.allocate_kv_cache(num_blocks=num_blocks, block_size=bs, num_kv_heads=hk, head_size=d,
                                      dtype=torch.float64, device=torch.device("cpu"))
    for phase in ("old", "new"):
        keys, vals, sl = [], [], []
        for b, (ctx, q) in enumerate(seqs):
            lo, hi = (0, ctx - q) if phase == "old" else (ctx - q, ctx)
            if hi > lo:
                keys.append(ctx_k[b][lo:hi])
                vals.append(ctx_v[b][lo:hi])
                sl.append(slots(b, lo, hi))
        if not keys:
            continue
        k, k64 = _pair(torch.cat(keys), dtype, device)
        v, v64 = _pair(torch.cat(vals), dtype, device)
        s = torch.cat(sl)
        ops.write_kv_cache(key=k, value=v, kv_cache=cache, slot_mapping=s.to(device))
        ref.write_kv_cache(key=k64, value=v64, kv_cache=ref_cache, slot_mapping=s)

    q, q64 = _pair(q_all, dtype, device)
    seq_lens = torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32)
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor([q for _, q in seqs]), 0)
    common = dict(max_query_len=max(q for _, q in seqs), max_seq_len=max(ctx for ctx, _ in seqs), scale=d**-0.5,
                  sliding_window=case["sliding_window"], logits_soft_cap=case["logits_soft_cap"])
    out = ops.paged_attention(query=q, kv_cache=cache, block_table=block_table.to(device), seq_lens=seq_lens.to(device),
                              query_start_loc=qsl.to(device), **common)
    expect = ref.paged_attention(query=q64, kv_cache=ref_cache, block_table=block_table, seq_lens=seq_lens,
                                 query_start_loc=qsl, **common)
    return _worst(("out", out, expect), op="paged_attention", dtype=dtype)


def check_moe_topk(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    g = _gen(case["seed"])
    logits, logits64 = _pair(_rand(g, case["tokens"], case["num_experts"], scale=2.0), dtype, device)
    bias64 = (0.1 * _rand(g, case["num_experts"])).to(torch.float32) if case["bias"] else None
    args = dict(top_k=case["top_k"], scoring_func=case["scoring_func"], renormalize=case["renormalize"],
                num_expert_group=case["num_expert_group"], topk_group=case["topk_group"],
                routed_scaling_factor=case["routed_scaling_factor"])
    w, ids = ops.moe_topk(router_logits=logits, e_score_correction_bias=None if bias64 is None else bias64.to(device), **args)
    rw, rids = ref.moe_topk(router_logits=logits64, e_score_correction_bias=None if bias64 is None else bias64.double(), **args)
    if ids.dtype != torch.int32 or w.dtype != torch.float32:
        return CheckResult(float("inf"), f"expected (float32 weights, int32 ids), got ({w.dtype}, {ids.dtype})")
    if tuple(ids.shape) != tuple(rids.shape):
        return CheckResult(float("inf"), f"topk_ids shape {tuple(ids.shape)} != {tuple(rids.shape)}")
    ids_c = ids.cpu().long()
    # Compare as sets per token, so near-ties in low precision may order differently; a different set is
    # only accepted where the reference's k-th and (k+1)-th choice scores are a rounding apart.
    same = (ids_c.sort(dim=1).values == rids.long().sort(dim=1).values).all(dim=1)
    if not bool(same.all()):
        scores = torch.softmax(logits64, -1) if case["scoring_func"] == "softmax" else torch.sigmoid(logits64)
        choice = scores + (bias64.double() if bias64 is not None else 0)
        srt = choice.sort(dim=1, descending=True).values
        k = case["top_k"]
        gap = (srt[:, k - 1] - srt[:, k]).abs() if k < srt.shape[1] else torch.full((srt.shape[0],), float("inf"))
        rtol, _ = tolerance("moe_topk", dtype)
        near_tie = gap <= 4 * max(rtol, 1e-6) * srt[:, k - 1].abs().clamp(min=1e-3)
        bad = (~same) & (~near_tie)
        if bool(bad.any()):
            t = int(bad.nonzero()[0])
            return CheckResult(float("inf"), f"token {t}: experts {ids_c[t].tolist()} != expected {rids[t].tolist()}")
        keep = same
    else:
        keep = torch.ones_like(same)
    # weights aligned by expert id
    order = ids_c[keep].argsort(dim=1)
    rorder = rids.long()[keep].argsort(dim=1)
    got = w.cpu()[keep].gather(1, order)
    exp = rw[keep].gather(1, rorder)
    return _worst(("topk_weights", got, exp), op="moe_topk", dtype=dtype)


def check_fused_experts(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    g = _gen(case["seed"])
    t, hd, inter, e, k = case["tokens"], case["hidden"], case["intermediate"], case["num_experts"], case["top_k"]
    x, x64 = _pair(_rand(g, t, hd), dtype, device)
    w13, w13_64 = _pair(_rand(g, e, 2 * inter, hd, scale=hd**-0.5), dtype, device)
    w2, w2_64 = _pair(_rand(g, e, hd, inter, scale=inter**-0.5), dtype, device)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    wts = torch.softmax(_rand(g, t, k), -1).to(torch.float32)
    expert_map = None
    if case["ep"]:
        # this rank holds every other expert; the rest are another rank's (-1)
        local = torch.arange(0, e, 2)
        expert_map = torch.full((e,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(local.numel(), dtype=torch.int32)
        w13, w13_64, w2, w2_64 = w13[local.to(w13.device)], w13_64[local], w2[local.to(w2.device)], w2_64[local]
    args = dict(topk_weights=wts, topk_ids=ids, activation=case["activation"], expert_map=expert_map)
    dev_args = {kk: (v.to(device) if isinstance(v, torch.Tensor) else v) for kk, v in args.items()}
    out = ops.fused_experts(hidden_states=x, w13=w13, w2=w2, **dev_args)
    expect = ref.fused_experts(hidden_states=x64, w13=w13_64, w2=w2_64, **args)
    return _worst(("out", out, expect), op="fused_experts", dtype=dtype)


def check_argmax(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    """Exact: every row's index equals ``torch.argmax`` of the same rounded values in float64 (first maximum,
    NaN the largest, -0.0 == 0.0), and ``out``'s neighbours in its buffer are untouched."""
    g = _gen(case["seed"])
    rows, cols = case["rows"], case["cols"]
    x64 = _rand(g, rows, cols, scale=3.0)
    if case["ties"]:  # a few distinct values: many rows have their maximum more than once
        x64 = x64.round()
    if case["special"]:  # NaN, infinities and signed zeros at random places
        for value in (float("nan"), float("inf"), float("-inf"), -0.0, 0.0):
            n = int(torch.randint(0, max(1, rows * cols // 50) + 1, (1,), generator=g))
            at = torch.randint(0, rows * cols, (n,), generator=g)
            x64.view(-1)[at] = value
    x, xr = _pair(x64, dtype, device, noncontig=case["noncontig"])
    buf = torch.full((rows + 2,), -7, dtype=torch.int64, device=device)
    out = buf[1 : rows + 1]
    res = ops.argmax(x=x, out=out)
    if res.data_ptr() != out.data_ptr() or tuple(res.shape) != (rows,):
        return CheckResult(float("inf"), "argmax must return out (its results written into it)")
    got = buf.cpu()
    want = xr.argmax(dim=-1)
    if got[0] != -7 or got[-1] != -7:
        return CheckResult(float("inf"), "argmax wrote outside out (the entries around it in its buffer)")
    bad = (got[1:-1] != want).nonzero()
    if bad.numel():
        r = int(bad[0])
        return CheckResult(float("inf"), f"row {r}: index {int(got[r + 1])} (value {float(xr[r, int(got[r + 1])])}) "
                           f"!= torch.argmax {int(want[r])} (value {float(xr[r, int(want[r])])})")
    return CheckResult(0.0, f"{rows} rows x {cols}: every index exact")


def check_dynamic_int8_quant(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    g = _gen(case["seed"])
    x64 = _rand(g, case["m"], case["k"])
    if case["zero_row"]:
        x64[0] = 0
    x, x64 = _pair(x64, dtype, device)
    xq, s = ops.dynamic_int8_quant(x=x)
    rq, rs = ref.dynamic_int8_quant(x=x64)
    if xq.dtype != torch.int8 or s.dtype != torch.float32 or tuple(s.shape) != (case["m"], 1):
        return CheckResult(float("inf"), f"expected int8 x_q and float32 scales [m, 1], got {xq.dtype}, {s.dtype} {tuple(s.shape)}")
    off = (xq.cpu().int() - rq.int()).abs().max().item() if xq.numel() else 0
    if off > 1:
        return CheckResult(float("inf"), f"x_q differs from the reference by {off} (at most 1 allowed at half-integers)")
    return _worst(("scales", s, rs), op="dynamic_int8_quant", dtype=torch.float32)


def check_int8_scaled_mm(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    g = _gen(case["seed"])
    m, n, k = case["m"], case["n"], case["k"]
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    sa = (torch.rand(m, 1, generator=g, dtype=torch.float64) * 0.02 + 1e-3).to(torch.float32)
    sb = (torch.rand(n, generator=g, dtype=torch.float64) * 0.02 + 1e-3).to(torch.float32)
    bias, bias64 = _pair(_rand(g, n), dtype, device) if case["bias"] else (None, None)
    out = ops.int8_scaled_mm(a=a.to(device), b=b.to(device), scale_a=sa.to(device), scale_b=sb.to(device),
                             out_dtype=dtype, bias=bias)
    # exact integer products, scales applied in float64: independent of the reference backend
    expect = (a.long() @ b.long().t()).double() * sa.double() * sb.double()[None, :]
    if bias64 is not None:
        expect = expect + bias64
    if out.dtype != dtype:
        return CheckResult(float("inf"), f"out has dtype {out.dtype}, expected out_dtype {dtype}")
    return _worst(("out", out, expect), op="int8_scaled_mm", dtype=dtype)


def check_linear(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    """``linear`` with and without what ``prepare_linear`` returned, against a float64 product (m rows spread
    over leading dims, optionally a non-contiguous weight view)."""
    g = _gen(case["seed"])
    m, n, k = case["m"], case["n"], case["k"]
    lead = (m,) if not case["batched"] else (1, m)
    x, x64 = _pair(_rand(g, *lead, k), dtype, device)
    w, w64 = _pair(_rand(g, n, k, scale=k**-0.5), dtype, device, noncontig=case["noncontig"])
    bias, bias64 = _pair(_rand(g, n), dtype, device) if case["bias"] else (None, None)
    expect = x64 @ w64.t() + (bias64 if bias64 is not None else 0)  # independent float64 product
    before = w.detach().clone()
    prepared = ops.prepare_linear(weight=w) if case["prepare"] else None
    changed = _unchanged("weight", before, w)
    if changed is not None:
        return changed
    out = ops.linear(x=x, weight=w, bias=bias, prepared=prepared)
    changed = _unchanged("weight", before, w)
    if changed is not None:
        return changed
    if out.dtype != dtype:
        return CheckResult(float("inf"), f"out has dtype {out.dtype}, expected x's dtype {dtype}")
    return _worst(("out", out, expect), op="linear", dtype=dtype)


def check_rope_and_write_kv_cache(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    """The fused rotary + KV write (API 1.3) against the float64 composite of the reference.

    Every slot of the cache first holds older keys and values (``write_kv_cache``); the fused op then
    writes the new tokens (some with slot -1: rotated, never written). The returned query and key are
    compared directly; the cache through the backend's own ``paged_attention``, one decode sequence per
    block reading every slot, so a wrong key rotation, a missing value or a stray write (a padding token
    written anywhere) changes an output.
    """
    g = _gen(case["seed"])
    t, h, hk, d, bs = case["tokens"], case["num_heads"], case["num_kv_heads"], case["head_size"], case["block_size"]
    layout = ops.kv_cache_layout(num_kv_heads=hk, head_size=d, dtype=dtype)
    if bs not in layout.block_sizes:
        return CheckResult(float("inf"), f"block size {bs} drawn from the layout's block_sizes {layout.block_sizes} was refused")
    qkv64 = _rand(g, t, (h + 2 * hk) * d)
    low = qkv64.to(dtype)
    qkv_ref = low.to(torch.float64)
    parts = [h * d, hk * d, hk * d]
    if case["strided"]:  # views of one qkv buffer, as an attention layer passes them
        q, k, v = (p.view(t, -1, d) for p in low.to(device).split(parts, dim=-1))
    else:
        q, k, v = (p.reshape(t, -1, d).contiguous().to(device) for p in low.split(parts, dim=-1))
    q64, k64, v64 = (p.reshape(t, -1, d) for p in qkv_ref.split(parts, dim=-1))
    pos = torch.randint(0, case["max_position"], (t,), generator=g, dtype=torch.int64)
    num_blocks = -(-t // bs) + 2
    slots = torch.randperm(num_blocks * bs, generator=g)[:t].to(torch.int64)
    pad = torch.randperm(t, generator=g)[: min(case["padding"], t)]
    slots[pad] = -1

    # older context in every slot
    cache = ops.allocate_kv_cache(num_blocks=num_blocks, block_size=bs, num_kv_heads=hk, head_size=d, dtype=dtype,
                                  device=torch.device(device))
    ref_cache = ref.allocate_kv_cache(num_blocks=num_blocks, block_size=bs, num_kv_heads=hk, head_size=d,
                                      dtype=torch.float64, device=torch.device("cpu"))
    old_k, old_k64 = _pair(_rand(g, num_blocks * bs, hk, d), dtype, device)
    old_v, old_v64 = _pair(_rand(g, num_blocks * bs, hk, d), dtype, device)
    every = torch.arange(num_blocks * bs, dtype=torch.int64)
    ops.write_kv_cache(key=old_k, value=old_v, kv_cache=cache, slot_mapping=every.to(device))
    ref.write_kv_cache(key=old_k64, value=old_v64, kv_cache=ref_cache, slot_mapping=every)

    cache_cs64 = rope_cache(case["max_position"], case["rotary_dim"])
    cos_sin = cache_cs64.to(torch.float32).to(device)
    args = dict(head_size=d, rotary_dim=case["rotary_dim"], is_neox=case["is_neox"])
    v_before = v.clone()
    qo, ko = ops.rope_and_write_kv_cache(positions=pos.to(device), query=q, key=k, value=v, cos_sin_cache=cos_sin,
                                         kv_cache=cache, slot_mapping=slots.to(device), **args)
    bad = _unchanged("value", v_before, v)
    if bad:
        return bad
    # the contract casts cos/sin to the query's dtype before the products: give the reference those values
    cs_ref = cos_sin.cpu().to(dtype).to(torch.float64)
    qr, kr = ref.rope_and_write_kv_cache(positions=pos, query=q64.clone(), key=k64.clone(), value=v64,
                                         cos_sin_cache=cs_ref, kv_cache=ref_cache, slot_mapping=slots, **args)
    rotated = _worst(("query", qo, qr), ("key", ko, kr), op="rotary_embedding", dtype=dtype)

    # read the whole cache back through attention: sequence b = block b, full, one decode query
    block_table = torch.arange(num_blocks, dtype=torch.int32)[:, None]
    seq_lens = torch.full((num_blocks,), bs, dtype=torch.int32)
    qsl = torch.arange(num_blocks + 1, dtype=torch.int32)
    aq, aq64 = _pair(_rand(g, num_blocks, h, d), dtype, device)
    common = dict(max_query_len=1, max_seq_len=bs, scale=d**-0.5, sliding_window=None, logits_soft_cap=None)
    out = ops.paged_attention(query=aq, kv_cache=cache, block_table=block_table.to(device),
                              seq_lens=seq_lens.to(device), query_start_loc=qsl.to(device), **common)
    expect = ref.paged_attention(query=aq64, kv_cache=ref_cache, block_table=block_table, seq_lens=seq_lens,
                                 query_start_loc=qsl, **common)
    read = _worst(("cache (read through paged_attention)", out, expect), op="rope_and_write_kv_cache", dtype=dtype)
    return rotated if rotated.ratio >= read.ratio else read


def check_act_and_mul_linear(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    """The fused gated activation + linear (API 1.3), with and without what ``prepare_linear`` returned,
    against the float64 composite of the reference (the activation unrounded)."""
    g = _gen(case["seed"])
    m, n, k = case["m"], case["n"], case["k"]
    lead = (m,) if not case["batched"] else (1, m)
    x, x64 = _pair(_rand(g, *lead, 2 * k), dtype, device, case["noncontig"])
    w, w64 = _pair(_rand(g, n, k, scale=k**-0.5), dtype, device)
    bias, bias64 = _pair(_rand(g, n), dtype, device) if case["bias"] else (None, None)
    x_before = x.clone()
    prepared = ops.prepare_linear(weight=w) if case["prepare"] else None
    out = ops.act_and_mul_linear(x=x, weight=w, bias=bias, prepared=prepared, activation=case["activation"])
    bad = _unchanged("x", x_before, x)
    if bad:
        return bad
    if out.dtype != dtype:
        return CheckResult(float("inf"), f"out has dtype {out.dtype}, expected x's dtype {dtype}")
    expect = ref.act_and_mul_linear(x=x64, weight=w64, bias=bias64, prepared=None, activation=case["activation"])
    return _worst(("out", out, expect), op="act_and_mul_linear", dtype=dtype)


def check_decoder_layer_decode(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any) -> CheckResult:
    """The whole decoder layer at a decode step (API 1.4) against the float64 layer built from the
    reference's ops, as the hookspec defines it. Every sequence has a cached context (written with the
    backend's ``write_kv_cache``); a None result (the backend declines these inputs) passes, having
    written nothing; otherwise the outputs are compared, and the cache is read back through the backend's
    ``paged_attention`` (the new keys and values must be at their slots)."""
    return _check_whole_layer(case, ops, ref, dtype, device, moe=False)


def check_moe_decoder_layer_decode(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype,
                                   device: Any) -> CheckResult:
    """The whole Mixtral-style layer at a decode step (API 1.5), as :func:`check_decoder_layer_decode`
    checks the dense one, the feed-forward being the reference's router linear, moe_topk and fused_experts.
    Where the float64 router's k-th and (k+1)-th logits of a token are within the dtype's rounding of each
    other, the layer with the (k+1)-th expert in place of the k-th is an accepted answer for that token too."""
    return _check_whole_layer(case, ops, ref, dtype, device, moe=True)


def _check_whole_layer(case: dict, ops: OpTable, ref: OpTable, dtype: torch.dtype, device: Any,
                       moe: bool) -> CheckResult:
    op = "moe_decoder_layer_decode" if moe else "decoder_layer_decode"
    g = _gen(case["seed"])
    t, hid, inter = case["tokens"], case["hidden"], case["intermediate"]
    h, hk, d, bs, ctx = case["num_heads"], case["num_kv_heads"], case["head_size"], case["block_size"], case["context"]
    layout = ops.kv_cache_layout(num_kv_heads=hk, head_size=d, dtype=dtype)
    if bs not in layout.block_sizes:
        return CheckResult(float("inf"), f"block size {bs} drawn from the layout's block_sizes {layout.block_sizes} was refused")
    w = {"input_norm_weight": 1 + 0.1 * _rand(g, hid), "qkv_weight": _rand(g, (h + 2 * hk) * d, hid, scale=hid**-0.5),
         "o_weight": _rand(g, hid, h * d, scale=(h * d) ** -0.5), "post_norm_weight": 1 + 0.1 * _rand(g, hid)}
    if moe:
        e = case["num_experts"]
        w.update(router_weight=_rand(g, e, hid, scale=2 * hid**-0.5), w13=_rand(g, e, 2 * inter, hid, scale=hid**-0.5),
                 w2=_rand(g, e, hid, inter, scale=inter**-0.5))
        routing = {"top_k": case["top_k"], "renormalize": case["renormalize"]}
    else:
        w.update(gate_up_weight=_rand(g, 2 * inter, hid, scale=hid**-0.5),
                 down_weight=_rand(g, hid, inter, scale=inter**-0.5))
        routing = {}
    pairs = {k: _pair(v, dtype, device) for k, v in w.items()}
    x, x64 = _pair(_rand(g, t, hid), dtype, device)
    res, res64 = _pair(_rand(g, t, hid), dtype, device) if not case["first_layer"] else (None, None)
    per_seq = -(-(ctx + 1) // bs)
    num_blocks = t * per_seq + 1
    table = torch.randperm(num_blocks, generator=g)[: t * per_seq].view(t, per_seq).to(torch.int32)
    seq_lens = torch.full((t,), ctx + 1, dtype=torch.int32)
    slots = (table[:, ctx // bs].to(torch.int64) * bs + ctx % bs)
    pos = torch.randint(ctx, ctx + 64, (t,), generator=g, dtype=torch.int64)
    cache = ops.allocate_kv_cache(num_blocks=num_blocks, block_size=bs, num_kv_heads=hk, head_size=d, dtype=dtype,
                                  device=torch.device(device))
    ref_cache = ref.allocate_kv_cache(num_blocks=num_blocks, block_size=bs, num_kv_heads=hk, head_size=d,
                                      dtype=torch.float64, device=torch.device("cpu"))
    if ctx:
        old = torch.cat([table[b, p // bs].to(torch.int64)[None] * bs + p % bs for b in range(t) for p in range(ctx)])
        ok, ok64 = _pair(_rand(g, old.numel(), hk, d), dtype, device)
        ov, ov64 = _pair(_rand(g, old.numel(), hk, d), dtype, device)
        ops.write_kv_cache(key=ok, value=ov, kv_cache=cache, slot_mapping=old.to(device))
        ref.write_kv_cache(key=ok64, value=ov64, kv_cache=ref_cache, slot_mapping=old)
    cos_sin = rope_cache(ctx + 64, d).to(torch.float32)
    cs_ref = cos_sin.to(dtype).to(torch.float64)  # the ops cast cos/sin to the dtype before the products
    common = dict(eps=1e-5, num_heads=h, num_kv_heads=hk, head_size=d, rotary_dim=d, is_neox=case["is_neox"],
                  scale=d**-0.5, max_seq_len=ctx + 1)
    x_before = x.clone()
    out = getattr(ops, op)(
        hidden_states=x, residual=res, positions=pos.to(device), cos_sin_cache=cos_sin.to(device), kv_cache=cache,
        slot_mapping=slots.to(device), block_table=table.to(device), seq_lens=seq_lens.to(device),
        **{k: v[0] for k, v in pairs.items()}, **routing, **common)
    bad = _unchanged("hidden_states", x_before, x)
    if bad:
        return bad
    if out is None:
        return CheckResult(0.0, "declined (None): the layer runs op by op")
    # the float64 layer from the reference's ops, exactly as the hookspec writes it
    w64 = {k: v[1] for k, v in pairs.items()}
    if res64 is None:
        r64, y = x64, ref.rms_norm(x=x64, weight=w64["input_norm_weight"], eps=1e-5)
    else:
        y, r64 = ref.fused_add_rms_norm(x=x64, residual=res64, weight=w64["input_norm_weight"], eps=1e-5)
    q, k, v = ref.linear(x=y, weight=w64["qkv_weight"], bias=None, prepared=None).split([h * d, hk * d, hk * d], -1)
    q, k = ref.rope_and_write_kv_cache(positions=pos, query=q.reshape(t, h, d), key=k.reshape(t, hk, d),
                                       value=v.reshape(t, hk, d), cos_sin_cache=cs_ref, head_size=d, rotary_dim=d,
                                       is_neox=case["is_neox"], kv_cache=ref_cache, slot_mapping=slots)
    qsl = torch.arange(t + 1, dtype=torch.int32)
    attn = dict(max_query_len=1, max_seq_len=ctx + 1, scale=d**-0.5, sliding_window=None, logits_soft_cap=None)
    a = ref.paged_attention(query=q, kv_cache=ref_cache, block_table=table, seq_lens=seq_lens, query_start_loc=qsl, **attn)
    y, r64 = ref.fused_add_rms_norm(x=ref.linear(x=a.reshape(t, -1), weight=w64["o_weight"], bias=None, prepared=None),
                                    residual=r64, weight=w64["post_norm_weight"], eps=1e-5)
    if moe:
        expect = _moe_expect(out[0], y, w64, case, ref, dtype)
    else:
        gu = ref.linear(x=y, weight=w64["gate_up_weight"], bias=None, prepared=None)
        expect = ref.act_and_mul_linear(x=gu, weight=w64["down_weight"], bias=None, prepared=None, activation="silu")
    layer = _worst(("hidden_out", out[0], expect), ("residual_out", out[1], r64), op=op, dtype=dtype)
    # the new keys and values: read the whole cache back through the backend's attention
    aq, aq64 = _pair(_rand(g, t, h, d), dtype, device)
    got = ops.paged_attention(query=aq, kv_cache=cache, block_table=table.to(device), seq_lens=seq_lens.to(device),
                              query_start_loc=qsl.to(device), **attn)
    want = ref.paged_attention(query=aq64, kv_cache=ref_cache, block_table=table, seq_lens=seq_lens,
                               query_start_loc=qsl, **attn)
    read = _worst(("cache (read through paged_attention)", got, want), op="rope_and_write_kv_cache", dtype=dtype)
    return layer if layer.ratio >= read.ratio else read


def _moe_expect(got: torch.Tensor, y: torch.Tensor, w64: dict, case: dict, ref: OpTable, dtype: torch.dtype) -> torch.Tensor:
    """The float64 routed experts of ``y`` (the post-attention normed rows); for a token whose k-th and
    (k+1)-th router logits are within the dtype's rounding, the row of either choice nearer ``got``."""
    k, renorm = case["top_k"], case["renormalize"]
    logits = ref.linear(x=y, weight=w64["router_weight"], bias=None, prepared=None)
    wts, ids = ref.moe_topk(router_logits=logits, top_k=k, scoring_func="softmax", renormalize=renorm,
                            num_expert_group=None, topk_group=None, e_score_correction_bias=None,
                            routed_scaling_factor=1.0)
    experts = dict(hidden_states=y, w13=w64["w13"], w2=w64["w2"], activation="silu", expert_map=None)
    expect = ref.fused_experts(topk_weights=wts, topk_ids=ids, **experts)
    if k >= logits.shape[1]:
        return expect
    srt, order = logits.sort(dim=1, descending=True)
    rtol, _ = tolerance("linear", dtype)
    near = (srt[:, k - 1] - srt[:, k]) <= 8 * rtol * srt[:, k - 1 : k + 1].abs().amax(dim=1).clamp(min=1.0)
    if not bool(near.any()):
        return expect
    alt_ids = torch.cat([order[:, : k - 1], order[:, k : k + 1]], dim=1)
    scores = torch.softmax(logits, dim=-1).gather(1, alt_ids)
    alt_w = scores / scores.sum(dim=1, keepdim=True) if renorm else scores
    alt = ref.fused_experts(topk_weights=alt_w, topk_ids=alt_ids.to(torch.int32), **experts)
    g = got.detach().to("cpu", torch.float64)
    pick = near & ((g - alt).abs().amax(dim=1) < (g - expect).abs().amax(dim=1))
    return torch.where(pick[:, None], alt, expect)


#: ops checked through another op's check (the KV-cache group is exercised only through paged_attention,
#: prepare_linear only through linear)
CHECKED_VIA = {"kv_cache_layout": "paged_attention", "allocate_kv_cache": "paged_attention",
               "write_kv_cache": "paged_attention", "prepare_linear": "linear"}

CHECKS = {
    "rms_norm": check_rms_norm,
    "fused_add_rms_norm": check_fused_add_rms_norm,
    "silu_and_mul": check_silu_and_mul,
    "gelu_and_mul": check_gelu_and_mul,
    "rotary_embedding": check_rotary_embedding,
    "paged_attention": check_paged_attention,
    "moe_topk": check_moe_topk,
    "fused_experts": check_fused_experts,
    "argmax": check_argmax,
    "dynamic_int8_quant": check_dynamic_int8_quant,
    "int8_scaled_mm": check_int8_scaled_mm,
    "linear": check_linear,
    "rope_and_write_kv_cache": check_rope_and_write_kv_cache,
    "act_and_mul_linear": check_act_and_mul_linear,
    "decoder_layer_decode": check_decoder_layer_decode,
    "moe_decoder_layer_decode": check_moe_decoder_layer_decode,
}
