"""Rotary position embedding: ``get_rope`` builds a ``cos_sin_cache`` per rope type; the op applies it.

Frequencies are computed in float32 exactly as Hugging Face transformers' rope init functions
(``transformers.modeling_rope_utils``) compute them, so a model's numbers match transformers'. Scaling that
HF applies to cos/sin (YaRN's mscale, LongRoPE's attention factor) is folded into the cache.

Position-dependent rope types. Hugging Face recomputes the frequencies of ``dynamic`` (NTK) and
``longrope`` from the *current sequence length*; a paged cache needs one fixed rotation per position. We
rotate position ``p`` with the frequencies HF uses when it decodes that position one token at a time
(sequence length ``p + 1``):

* ``dynamic``: positions below ``max_position_embeddings`` use the plain frequencies (HF's result for any
  sequence within ``max_position_embeddings``); position ``p`` beyond uses HF's NTK base for
  ``seq_len = p + 1``. The cache covers ``max_position * factor`` positions. A single HF forward over a
  prompt longer than ``max_position_embeddings`` instead rotates *all* its positions with the prompt's
  final base, so such prefills differ from HF there (token-by-token decoding matches).
* ``longrope``: positions below ``original_max_position_embeddings`` use ``short_factor``, later ones
  ``long_factor`` (HF switches the whole sequence to ``long_factor`` once it is longer; token-by-token
  decoding matches).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from accel_models.context import get_build_context

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    # HF: 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _require(params: dict[str, Any], *keys: str, rope_type: str) -> None:
    missing = [k for k in keys if params.get(k) is None]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs rope_parameters {missing}; got {sorted(params)}")


def _llama3_inv_freq(base: float, dim: int, p: dict[str, Any]) -> torch.Tensor:
    _require(p, "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", rope_type="llama3")
    inv_freq = _base_inv_freq(base, dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn_inv_freq(base: float, dim: int, p: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    _require(p, "original_max_position_embeddings", rope_type="yarn")
    original = p["original_max_position_embeddings"]
    factor = p.get("factor")
    if factor is None:
        factor = max_position / original
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: prevent a singularity
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def _cos_sin(freqs: torch.Tensor, scaling: float) -> torch.Tensor:
    """``freqs`` [P, dim/2] float32 -> [P, dim] ``cat(cos, sin)`` times ``scaling`` (HF's order of operations)."""
    cos, sin = freqs.cos(), freqs.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return torch.cat((cos, sin), dim=-1)


def _positions(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64).float()


def compute_cos_sin_cache(
    head_size: int, rotary_dim: int, max_position: int, rope_parameters: dict[str, Any]
) -> torch.Tensor:
    """The ``[positions, rotary_dim]`` float32 cache for ``rope_parameters`` (a transformers-5-style dict)."""
    p = dict(rope_parameters or {})
    rope_type = p.get("rope_type", p.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if "rope_theta" not in p or p["rope_theta"] is None:
        raise ValueError(f"rope_parameters must give rope_theta, got {p}")
    base = float(p["rope_theta"])
    dim = rotary_dim
    if dim % 2 or not 0 < dim <= head_size:
        raise ValueError(f"rotary_dim must be even and in (0, head_size={head_size}], got {dim}")
    t = _positions(max_position)

    if rope_type == "default":
        return _cos_sin(torch.outer(t, _base_inv_freq(base, dim)), 1.0)
    if rope_type == "linear":
        _require(p, "factor", rope_type=rope_type)
        inv_freq = _base_inv_freq(base, dim)
        inv_freq /= p["factor"]
        return _cos_sin(torch.outer(t, inv_freq), 1.0)
    if rope_type == "llama3":
        return _cos_sin(torch.outer(t, _llama3_inv_freq(base, dim, p)), 1.0)
    if rope_type == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(base, dim, p, max_position)
        return _cos_sin(torch.outer(t, inv_freq), attention_factor)
    if rope_type == "dynamic":
        _require(p, "factor", rope_type=rope_type)
        factor = float(p["factor"])
        total = max(max_position, int(max_position * factor))
        # Within max_position HF's NTK base reduces to the plain base (seq_len = max_position).
        rows = [torch.outer(_positions(max_position), _base_inv_freq(base, dim))]
        if total > max_position:
            exps = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
            seq_len = torch.arange(max_position + 1, total + 1, dtype=torch.float64)
            ntk_base = base * ((factor * seq_len / max_position) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / (ntk_base.to(torch.float32)[:, None] ** exps[None, :])  # [P', dim/2]
            rows.append(torch.arange(max_position, total, dtype=torch.int64).float()[:, None] * inv_freq)
        return _cos_sin(torch.cat(rows), 1.0)
    # longrope
    _require(p, "short_factor", "long_factor", "original_max_position_embeddings", rope_type=rope_type)
    original = int(p["original_max_position_embeddings"])
    factor = p.get("factor")
    if factor is None:
        factor = max_position / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    for key in ("short_factor", "long_factor"):
        if len(p[key]) != dim // 2:
            raise ValueError(f"longrope {key} has {len(p[key])} entries; expected rotary_dim / 2 = {dim // 2}")
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float32) * base**shape)
    long = 1.0 / (torch.tensor(p["long_factor"], dtype=torch.float32) * base**shape)
    n_short = min(original, max_position)
    freqs = torch.cat((torch.outer(t[:n_short], short), torch.outer(t[n_short:], long)))
    return _cos_sin(freqs, float(attention_factor))


class RotaryEmbedding(nn.Module):
    """Applies a precomputed ``cos_sin_cache`` with the bound ``rotary_embedding`` op.

    ``forward(positions [T] int64, query [T, H * D], key [T, Hk * D])`` -> rotated ``(query, key)``.
    """

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, cos_sin_cache: torch.Tensor,
                 is_neox: bool = True, *, rope_type: str = "default", prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.is_neox = is_neox
        self.rope_type = rope_type
        self._op = get_build_context().ops.rotary_embedding
        self.register_buffer("cos_sin_cache", cos_sin_cache, persistent=False)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._op(positions=positions, query=query, key=key, cos_sin_cache=self.cos_sin_cache,
                        head_size=self.head_size, rotary_dim=self.rotary_dim, is_neox=self.is_neox)

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, positions={self.cos_sin_cache.shape[0]}, "
                f"rope_type={self.rope_type}, is_neox={self.is_neox}")


_CACHE: dict[tuple[Any, ...], torch.Tensor] = {}


def _freeze(x: Any) -> Any:
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


def get_rope(
    head_size: int,
    rotary_dim: int,
    max_position: int,
    rope_parameters: dict[str, Any] | None,
    is_neox: bool = True,
    dtype: torch.dtype | None = None,
    *,
    prefix: str = "",
) -> RotaryEmbedding:
    """A :class:`RotaryEmbedding` for a transformers-5-style ``rope_parameters`` dict.

    Args:
        head_size: size of each attention head.
        rotary_dim: leading dims of each head that rotate (``int(head_size * partial_rotary_factor)``).
        max_position: ``max_position_embeddings``; the cache covers it (``dynamic``: times ``factor``).
        rope_parameters: ``{"rope_type": ..., "rope_theta": ..., <the type's fields>}``.
        is_neox: NeoX/Llama (halves) or GPT-J (interleaved) rotation.
        dtype: dtype of the cache (default float32; the op casts cos/sin to the query's dtype).
        prefix: the module's path in the model.

    Layers of one model share one cache tensor (built once per distinct set of arguments).
    """
    ctx = get_build_context()
    key = (head_size, rotary_dim, max_position, _freeze(rope_parameters or {}), dtype, str(ctx.device))
    cache = _CACHE.get(key)
    if cache is None:
        cache = compute_cos_sin_cache(head_size, rotary_dim, max_position, rope_parameters or {})
        cache = cache.to(device=ctx.device, dtype=dtype or torch.float32)
        _CACHE[key] = cache
    rope_type = (rope_parameters or {}).get("rope_type", "default")
    return RotaryEmbedding(head_size, rotary_dim, max_position, cache, is_neox, rope_type=rope_type, prefix=prefix)
