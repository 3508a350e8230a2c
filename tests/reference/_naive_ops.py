"""Naive float64 implementations of every op, written from the hookspec docstrings.

Deliberately slow and explicit (Python loops over tokens, heads, sequences, key positions, experts, rows)
and independent of the reference backend: numpy float64, no torch ops, no shared helpers with the code
under test. Each takes and returns numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        ms = sum(v * v for v in row) / len(row)
        out[i] = row / math.sqrt(ms + eps) * weight
    return out.reshape(x.shape)


def silu(v: float) -> float:
    return v / (1.0 + math.exp(-v)) if v > -700 else 0.0


def gelu(v: float, approximate: str) -> float:
    if approximate == "tanh":
        return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def act_and_mul(x: np.ndarray, act) -> np.ndarray:
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)
    out = np.empty((rows.shape[0], d))
    for i, row in enumerate(rows):
        for j in range(d):
            out[i, j] = act(row[j]) * row[d + j]
    return out.reshape(*x.shape[:-1], d)


def rotary(positions, x, cos_sin_cache, head_size, rotary_dim, is_neox):
    """x: [T, heads * head_size] or [T, heads, head_size]; cos_sin_cache rows already in x's dtype."""
    shape = x.shape
    x = x.reshape(shape[0], -1, head_size)
    out = x.copy()
    half = rotary_dim // 2
    for t, p in enumerate(positions):
        cos, sin = cos_sin_cache[p, :half], cos_sin_cache[p, half:]
        for h in range(x.shape[1]):
            for i in range(half):
                a, b = (i, i + half) if is_neox else (2 * i, 2 * i + 1)
                x1, x2 = x[t, h, a], x[t, h, b]
                out[t, h, a] = x1 * cos[i] - x2 * sin[i]
                out[t, h, b] = x2 * cos[i] + x1 * sin[i]
    return out.reshape(shape)


def paged_attention(query, keys, values, q_lens, seq_lens, scale, sliding_window, soft_cap):
    """query [T, H, D] packed by sequence; keys/values: per sequence [seq_len, kv_heads, D] (the context)."""
    num_heads = query.shape[1]
    out = np.zeros_like(query)
    row = 0
    for b in range(len(seq_lens)):
        k_all, v_all = keys[b], values[b]
        group = num_heads // k_all.shape[1]
        for i in range(q_lens[b]):
            p = seq_lens[b] - q_lens[b] + i
            for h in range(num_heads):
                kvh = h // group
                logits, vals = [], []
                for k in range(seq_lens[b]):
                    if k > p or (sliding_window is not None and k <= p - sliding_window):
                        continue
                    s = scale * float(np.dot(query[row, h], k_all[k, kvh]))
                    if soft_cap is not None:
                        s = soft_cap * math.tanh(s / soft_cap)
                    logits.append(s)
                    vals.append(v_all[k, kvh])
                m = max(logits)
                w = [math.exp(s - m) for s in logits]
                z = sum(w)
                acc = np.zeros(query.shape[2])
                for wk, vk in zip(w, vals):
                    acc += (wk / z) * vk
                out[row, h] = acc
            row += 1
    return out


def moe_topk(logits, top_k, scoring_func, renormalize, num_expert_group, topk_group, bias, routed_scaling_factor):
    num_tokens, num_experts = logits.shape
    weights = np.zeros((num_tokens, top_k))
    ids = np.zeros((num_tokens, top_k), dtype=np.int64)
    for t in range(num_tokens):
        if scoring_func == "softmax":
            m = max(logits[t])
            e = [math.exp(v - m) for v in logits[t]]
            scores = [v / sum(e) for v in e]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in logits[t]]
        choice = [s + (bias[i] if bias is not None else 0.0) for i, s in enumerate(scores)]
        eligible = list(range(num_experts))
        if num_expert_group is not None and num_expert_group > 1:
            size = num_experts // num_expert_group
            group_score = []
            for g in range(num_expert_group):
                members = sorted((choice[g * size + j] for j in range(size)), reverse=True)
                group_score.append(members[0] if bias is None else sum(members[:2]))
            best = sorted(range(num_expert_group), key=lambda g: (-group_score[g], g))[:topk_group]
            eligible = [e for e in range(num_experts) if e // size in best]
        chosen = sorted(eligible, key=lambda e: (-choice[e], e))[:top_k]
        w = [scores[e] for e in chosen]
        if renormalize:
            total = sum(w)
            w = [v / total for v in w]
        weights[t] = [v * routed_scaling_factor for v in w]
        ids[t] = chosen
    return weights, ids


def fused_experts(x, w13, w2, topk_weights, topk_ids, activation, expert_map):
    num_tokens, hidden = x.shape
    inter = w13.shape[1] // 2
    act = silu if activation == "silu" else (lambda v: gelu(v, "none"))
    out = np.zeros((num_tokens, hidden))
    for t in range(num_tokens):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            local = int(expert_map[e]) if expert_map is not None else e
            if local < 0:
                continue  # held by another rank
            h = w13[local] @ x[t]
            a = np.array([act(h[i]) * h[inter + i] for i in range(inter)])
            out[t] += topk_weights[t, j] * (w2[local] @ a)
    return out


def dynamic_int8_quant(x: np.ndarray):
    """Returns (x_q int64, scales float64, ambiguous bool mask: within rounding of a half-integer)."""
    x_q = np.zeros(x.shape, dtype=np.int64)
    scales = np.zeros((x.shape[0], 1))
    ambiguous = np.zeros(x.shape, dtype=bool)
    for i, row in enumerate(x):
        amax = max(abs(v) for v in row)
        scales[i, 0] = amax / 127.0
        if amax == 0:
            continue
        for j, v in enumerate(row):
            s = v * 127.0 / amax
            x_q[i, j] = round(s)  # Python's round is round-half-even
            ambiguous[i, j] = abs(abs(s - math.floor(s)) - 0.5) < 1e-4
    return x_q, scales, ambiguous


def int8_mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer product a @ b.T, row by row in Python ints."""
    out = np.zeros((a.shape[0], b.shape[0]), dtype=np.int64)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = sum(int(p) * int(q) for p, q in zip(a[i], b[j]))
    return out


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``y[..., i] = sum_j x[..., j] w[i, j] + b[i]``, one output element at a time."""
    flat = x.reshape(-1, x.shape[-1])
    out = np.zeros((flat.shape[0], weight.shape[0]))
    for r in range(flat.shape[0]):
        for i in range(weight.shape[0]):
            out[r, i] = sum(float(flat[r, j]) * float(weight[i, j]) for j in range(weight.shape[1]))
            if bias is not None:
                out[r, i] += float(bias[i])
    return out.reshape(*x.shape[:-1], weight.shape[0])


def argmax(x: np.ndarray) -> list[int]:
    """Per row: the first index of the maximum, a NaN larger than any number (the first NaN wins)."""
    out = []
    for row in x:
        best = 0
        for j in range(1, len(row)):
            if math.isnan(row[best]):
                break
            if math.isnan(row[j]) or row[j] > row[best]:
                best = j
        out.append(best)
    return out
