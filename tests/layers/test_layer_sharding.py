"""Tensor-parallel sharding of the linear family, the vocabulary embedding and FusedMoE.

Each rank of a simulated group (``rank``/``world_size`` set, no communication) loads the *full* checkpoint
tensors through the parameters' weight_loaders; the test checks each rank's slice against slices computed
here from the sharding rules, and that the ranks' partial results recombine to the unsharded math.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel_models import resolve_ops
from accel_models.context import BuildContext, ParallelGroup, build_context
from accel_models.layers import (
    ColumnParallelLinear,
    FusedMoE,
    LogitsProcessor,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from accel_models.layers.fused_moe import expert_range
from accel_models.layers.utils import missing_shards

OPS = resolve_ops("reference")


class FakeGroup(ParallelGroup):
    """One rank of a group, without communication (the tests combine the ranks' results themselves)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


def build(cls, *args, rank=0, world=1, ep=False, **kwargs):
    with build_context(BuildContext(ops=OPS, tp_group=FakeGroup(rank, world), ep_enabled=ep,
                                    params_dtype=torch.float64)):
        return cls(*args, **kwargs)


def load(layer, param, tensor, *shard):
    param.weight_loader(param, tensor, *shard)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_column_parallel_rows_and_gather(world):
    torch.manual_seed(0)
    w, b = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    outs = []
    for r in range(world):
        layer = build(ColumnParallelLinear, 5, 12, bias=True, rank=r, world=world, prefix="col")
        load(layer, layer.weight, w)
        load(layer, layer.bias, b)
        n = 12 // world
        assert torch.equal(layer.weight, w[r * n : (r + 1) * n])
        assert torch.equal(layer.bias, b[r * n : (r + 1) * n])
        outs.append(layer(x)[0])
    torch.testing.assert_close(torch.cat(outs, dim=-1), F.linear(x, w, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("world", [1, 2])
def test_merged_column_parallel_keeps_each_projections_slice(world):
    torch.manual_seed(1)
    gate, up = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    for r in range(world):
        layer = build(MergedColumnParallelLinear, 4, [6, 6], bias=False, rank=r, world=world, prefix="gate_up")
        load(layer, layer.weight, gate, 0)
        assert missing_shards(layer.weight) == {1}
        load(layer, layer.weight, up, 1)
        assert missing_shards(layer.weight) == set()
        n = 6 // world
        assert torch.equal(layer.weight, torch.cat((gate[r * n : (r + 1) * n], up[r * n : (r + 1) * n])))
        # the already-merged tensor loads to the same shard
        merged = build(MergedColumnParallelLinear, 4, [6, 6], bias=False, rank=r, world=world, prefix="gate_up")
        load(merged, merged.weight, torch.cat((gate, up)))
        assert torch.equal(merged.weight, layer.weight)


@pytest.mark.parametrize("heads,kv_heads,world", [(4, 2, 1), (4, 2, 2), (4, 4, 2), (4, 1, 2), (8, 2, 4)])
def test_qkv_parallel_heads_and_kv_replication(heads, kv_heads, world):
    torch.manual_seed(2)
    d, hidden = 3, 5
    q = torch.randn(heads * d, hidden, dtype=torch.float64)
    k = torch.randn(kv_heads * d, hidden, dtype=torch.float64)
    v = torch.randn(kv_heads * d, hidden, dtype=torch.float64)
    qb, kb, vb = (torch.randn(t.shape[0], dtype=torch.float64) for t in (q, k, v))
    for r in range(world):
        layer = build(QKVParallelLinear, hidden, d, heads, kv_heads, bias=True, rank=r, world=world, prefix="qkv")
        for sid, wt, bt in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            load(layer, layer.weight, wt, sid)
            load(layer, layer.bias, bt, sid)
        hq = heads // world
        local_kv = max(1, kv_heads // world)
        kv_head0 = (r * kv_heads) // world if world <= kv_heads else r // (world // kv_heads)
        rows_q = slice(r * hq * d, (r + 1) * hq * d)
        rows_kv = slice(kv_head0 * d, (kv_head0 + local_kv) * d)
        assert torch.equal(layer.weight, torch.cat((q[rows_q], k[rows_kv], v[rows_kv])))
        assert torch.equal(layer.bias, torch.cat((qb[rows_q], kb[rows_kv], vb[rows_kv])))
        fused = build(QKVParallelLinear, hidden, d, heads, kv_heads, bias=False, rank=r, world=world, prefix="qkv")
        load(fused, fused.weight, torch.cat((q, k, v)))
        assert torch.equal(fused.weight, layer.weight)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_row_parallel_columns_sum_to_the_full_product(world):
    torch.manual_seed(3)
    w, b = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x = torch.randn(2, 12, dtype=torch.float64)
    total = torch.zeros(2, 4, dtype=torch.float64)
    for r in range(world):
        layer = build(RowParallelLinear, 12, 4, bias=True, rank=r, world=world, reduce_results=False, prefix="row",
                      skip_bias_add=True)
        load(layer, layer.weight, w)
        load(layer, layer.bias, b)
        n = 12 // world
        assert torch.equal(layer.weight, w[:, r * n : (r + 1) * n])
        assert torch.equal(layer.bias, b)  # whole on every rank, added once after the reduction
        out, bias = layer(x[:, r * n : (r + 1) * n])
        total += out
    torch.testing.assert_close(total + bias, F.linear(x, w, b), rtol=1e-12, atol=1e-12)


def test_replicated_and_shape_errors_name_the_layer():
    layer = build(ReplicatedLinear, 3, 2, bias=False, prefix="model.gate")
    with pytest.raises(ValueError, match=r"shape mismatch.*\(3, 3\).*\(2, 3\)"):
        load(layer, layer.weight, torch.zeros(3, 3))
    col = build(ColumnParallelLinear, 3, 4, bias=False, rank=1, world=2, prefix="model.col")
    with pytest.raises(ValueError, match=r"model\.col.*\(6, 3\).*expected \(4, 3\)"):
        load(col, col.weight, torch.zeros(6, 3))
    qkv = build(QKVParallelLinear, 4, 2, 2, 1, bias=False, prefix="model.qkv")
    with pytest.raises(ValueError, match="shard_id must be"):
        load(qkv, qkv.weight, torch.zeros(4, 4), "x")
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size"):
        build(ColumnParallelLinear, 3, 5, rank=0, world=2, prefix="odd")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_vocab_parallel_embedding_and_lm_head(world):
    torch.manual_seed(4)
    vocab, dim = 11, 4  # 11 is not a multiple of 2 or 3: the last rank holds padding rows
    w = torch.randn(vocab, dim, dtype=torch.float64)
    ids = torch.tensor([0, 10, 5, 3, 7])
    h = torch.randn(2, dim, dtype=torch.float64)
    emb_sum = torch.zeros(len(ids), dim, dtype=torch.float64)
    shards = []
    for r in range(world):
        emb = build(VocabParallelEmbedding, vocab, dim, rank=r, world=world, prefix="embed")
        load(emb, emb.weight, w)
        per = -(-vocab // world)
        lo, hi = r * per, min((r + 1) * per, vocab)
        assert torch.equal(emb.weight[: hi - lo], w[lo:hi])
        assert not emb.weight[hi - lo :].any()
        emb.tp_group.all_reduce = lambda t: t  # the test sums the ranks itself
        emb_sum += emb(ids)
        head = build(ParallelLMHead, vocab, dim, rank=r, world=world, prefix="lm_head")
        load(head, head.weight, w)
        shards.append(F.linear(h, head.weight))
    torch.testing.assert_close(emb_sum, w[ids], rtol=0, atol=0)
    proc = build(LogitsProcessor, vocab, prefix="logits")
    head = build(ParallelLMHead, vocab, dim, prefix="lm_head")
    load(head, head.weight, w)
    torch.testing.assert_close(proc(head, h), h @ w.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(shards, dim=-1)[:, :vocab], h @ w.T, rtol=1e-12, atol=1e-12)


def _experts(num_experts, inter, hidden):
    torch.manual_seed(5)
    return [{s: torch.randn(*(shape), dtype=torch.float64) for s, shape in
             (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter)))} for _ in range(num_experts)]


def _naive_moe(x, logits, experts, top_k, renormalize):
    probs = torch.softmax(logits, dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, ids = torch.topk(probs[t], top_k)
        if renormalize:
            w = w / w.sum()
        for wt, e in zip(w, ids.tolist()):
            ex = experts[e]
            out[t] += wt * (ex["w2"] @ (F.silu(ex["w1"] @ x[t]) * (ex["w3"] @ x[t])))
    return out


@pytest.mark.parametrize("world,ep", [(1, False), (2, False), (2, True), (3, True)])
def test_fused_moe_shards_and_recombines(world, ep):
    num_experts, top_k, hidden, inter = 8, 2, 6, 4
    experts = _experts(num_experts, inter, hidden)
    x = torch.randn(5, hidden, dtype=torch.float64)
    logits = torch.randn(5, num_experts, dtype=torch.float64)
    total = torch.zeros_like(x)
    for r in range(world):
        moe = build(FusedMoE, num_experts, top_k, hidden, inter, rank=r, world=world, ep=ep, reduce_results=False,
                    prefix="moe.experts")
        for e, ex in enumerate(experts):
            for s, t in ex.items():
                load(moe, moe.w2_weight if s == "w2" else moe.w13_weight, t, s, e)
        assert not missing_shards(moe.w13_weight) and not missing_shards(moe.w2_weight)
        if ep:
            lo, hi = expert_range(num_experts, r, world)
            assert moe.num_local_experts == hi - lo
            assert moe.expert_map.tolist() == [i - lo if lo <= i < hi else -1 for i in range(num_experts)]
            for local, e in enumerate(range(lo, hi)):
                assert torch.equal(moe.w13_weight[local], torch.cat((experts[e]["w1"], experts[e]["w3"])))
                assert torch.equal(moe.w2_weight[local], experts[e]["w2"])
        else:
            n = inter // world
            sl = slice(r * n, (r + 1) * n)
            for e in range(num_experts):
                assert torch.equal(moe.w13_weight[e], torch.cat((experts[e]["w1"][sl], experts[e]["w3"][sl])))
                assert torch.equal(moe.w2_weight[e], experts[e]["w2"][:, sl])
        total += moe(x, logits)
    # routing weights are float32 by the moe_topk contract, hence float32-level agreement
    torch.testing.assert_close(total, _naive_moe(x, logits, experts, top_k, True), rtol=1e-6, atol=1e-6)


def test_fused_moe_loads_a_stacked_tensor_and_rejects_bad_ones():
    num_experts, hidden, inter = 4, 6, 4
    experts = _experts(num_experts, inter, hidden)
    moe = build(FusedMoE, num_experts, 2, hidden, inter, prefix="moe.experts")
    load(moe, moe.w13_weight, torch.stack([torch.cat((ex["w1"], ex["w3"])) for ex in experts]))
    assert missing_shards(moe.w2_weight) == {(e, "w2") for e in range(num_experts)}
    load(moe, moe.w2_weight, torch.stack([ex["w2"] for ex in experts]))
    assert not missing_shards(moe.w2_weight)
    assert torch.equal(moe.w13_weight[2, inter:], experts[2]["w3"])
    with pytest.raises(ValueError, match="expert id 4 out of range"):
        load(moe, moe.w13_weight, experts[0]["w1"], "w1", 4)
    with pytest.raises(ValueError, match="does not belong"):
        load(moe, moe.w13_weight, experts[0]["w2"], "w2", 0)
    with pytest.raises(ValueError, match=r"expert 1 w3.*\(3, 6\)"):
        load(moe, moe.w13_weight, torch.zeros(3, 6), "w3", 1)
