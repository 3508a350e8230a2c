"""get_rope against Hugging Face transformers' rope init functions, and the rotation against naive math."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers' rope functions are the reference")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from accel_models import resolve_ops  # noqa: E402
from accel_models.context import BuildContext, build_context  # noqa: E402
from accel_models.layers.rotary_embedding import compute_cos_sin_cache, get_rope  # noqa: E402

MAX_POS = 96
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 24},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 24},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 24,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "yarn-no-truncate": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "original_max_position_embeddings": 32,
                         "truncate": False},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 24},
}


def _hf_config(head_dim: int, rope: dict, partial: float = 1.0):
    rope = dict(rope)
    if rope["rope_type"] == "longrope":
        n = int(head_dim * partial) // 2
        rope["short_factor"] = [1.0 + 0.05 * i for i in range(n)]
        rope["long_factor"] = [1.5 + 0.25 * i for i in range(n)]
    if partial != 1.0:
        rope["partial_rotary_factor"] = partial
    cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                   max_position_embeddings=MAX_POS, rope_parameters=rope)
    return cfg, rope


def _hf_cos_sin(cfg, rope_type: str, positions: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    if rope_type == "default" and cfg.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        # Llama's default ignores partial_rotary_factor (it has no partial rotary); Phi-3's honours it
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        inv_freq, scaling = Phi3RotaryEmbedding.compute_default_rope_parameters(cfg)
    elif rope_type == "default":
        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len)
    freqs = positions[:, None].float() * inv_freq.float()
    return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("name", list(ROPES))
def test_cos_sin_cache_equals_transformers(name, head_dim):
    cfg, rope = _hf_config(head_dim, ROPES[name])
    ours = compute_cos_sin_cache(head_dim, head_dim, MAX_POS, rope)
    rope_type = rope["rope_type"]
    if rope_type in ("dynamic",):
        within = torch.arange(MAX_POS)  # HF: plain frequencies for any sequence within max_position_embeddings
        assert torch.equal(ours[:MAX_POS], _hf_cos_sin(cfg, rope_type, within))
        return
    if rope_type == "longrope":
        omp = rope["original_max_position_embeddings"]
        short = torch.arange(omp)
        assert torch.equal(ours[:omp], _hf_cos_sin(cfg, rope_type, short, seq_len=omp))
        long = torch.arange(omp, MAX_POS)
        assert torch.equal(ours[omp:], _hf_cos_sin(cfg, rope_type, long, seq_len=omp + 1))
        return
    assert ours.shape == (MAX_POS, head_dim)
    assert torch.equal(ours, _hf_cos_sin(cfg, rope_type, torch.arange(MAX_POS)))


def test_dynamic_ntk_beyond_max_position_is_hfs_token_by_token_base():
    head_dim = 32
    cfg, rope = _hf_config(head_dim, ROPES["dynamic"])
    ours = compute_cos_sin_cache(head_dim, head_dim, MAX_POS, rope)
    assert ours.shape[0] == 2 * MAX_POS  # the cache covers max_position * factor
    for p in (MAX_POS, MAX_POS + 1, MAX_POS + 37, 2 * MAX_POS - 1):
        ref = _hf_cos_sin(cfg, "dynamic", torch.tensor([p]), seq_len=p + 1)[0]
        torch.testing.assert_close(ours[p], ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("name", ["default", "yarn", "llama3", "longrope"])
def test_partial_rotary_dim_cache_equals_transformers(name):
    head_dim, partial = 64, 0.5
    cfg, rope = _hf_config(head_dim, ROPES[name], partial)
    rotary_dim = int(head_dim * partial)
    ours = compute_cos_sin_cache(head_dim, rotary_dim, MAX_POS, rope)
    n = rope.get("original_max_position_embeddings", MAX_POS)
    positions = torch.arange(n)
    assert ours.shape[1] == rotary_dim
    assert torch.equal(ours[:n], _hf_cos_sin(cfg, rope["rope_type"], positions, seq_len=n))


def _naive_rotate(x: torch.Tensor, pos: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int, neox: bool) -> torch.Tensor:
    """Loop-level rotation of x [T, H, D] in float64."""
    out = x.double().clone()
    half = rotary_dim // 2
    for t in range(x.shape[0]):
        c, s = cos_sin[pos[t], :half].double(), cos_sin[pos[t], half:].double()
        for h in range(x.shape[1]):
            for i in range(half):
                a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                x1, x2 = x[t, h, a].double(), x[t, h, b].double()
                out[t, h, a] = x1 * c[i] - x2 * s[i]
                out[t, h, b] = x2 * c[i] + x1 * s[i]
    return out


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rotary_module_rotates_like_naive_math(neox, rotary_dim):
    torch.manual_seed(0)
    head, heads, kv_heads, T = 16, 3, 1, 7
    with build_context(BuildContext(ops=resolve_ops("reference"))):
        rope = get_rope(head, rotary_dim, MAX_POS, ROPES["yarn"], is_neox=neox, prefix="rotary")
    pos = torch.tensor([0, 5, 1, 95, 33, 2, 64])
    q = torch.randn(T, heads * head, dtype=torch.float64)
    k = torch.randn(T, kv_heads * head, dtype=torch.float64)
    q_out, k_out = rope(pos, q.clone(), k.clone())
    cache = rope.cos_sin_cache
    torch.testing.assert_close(q_out.view(T, heads, head), _naive_rotate(q.view(T, heads, head), pos, cache, rotary_dim, neox),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k_out.view(T, kv_heads, head), _naive_rotate(k.view(T, kv_heads, head), pos, cache, rotary_dim, neox),
                               rtol=1e-12, atol=1e-12)


def test_rotary_module_matches_transformers_apply_rotary_pos_emb():
    torch.manual_seed(1)
    head, heads, T = 32, 2, 9
    cfg, rope_params = _hf_config(head, ROPES["llama3"])
    hf_rope = LlamaRotaryEmbedding(cfg)
    with build_context(BuildContext(ops=resolve_ops("reference"))):
        rope = get_rope(head, head, MAX_POS, rope_params)
    pos = torch.arange(T) * 7
    q, k = torch.randn(T, heads * head), torch.randn(T, heads * head)
    cos, sin = hf_rope(q, pos[None])
    hq, hk = apply_rotary_pos_emb(q.view(1, T, heads, head).transpose(1, 2), k.view(1, T, heads, head).transpose(1, 2),
                                  cos, sin)
    oq, ok = rope(pos, q.clone(), k.clone())
    torch.testing.assert_close(oq, hq.transpose(1, 2).reshape(T, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(ok, hk.transpose(1, 2).reshape(T, -1), rtol=0, atol=1e-6)


def test_bad_rope_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="not supported"):
        compute_cos_sin_cache(32, 32, 16, {"rope_type": "mrope", "rope_theta": 1.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        compute_cos_sin_cache(32, 32, 16, {"rope_type": "llama3", "rope_theta": 1.0, "factor": 8.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    with pytest.raises(ValueError, match="short_factor has 3 entries"):
        compute_cos_sin_cache(32, 32, 16, {"rope_type": "longrope", "rope_theta": 1.0, "short_factor": [1.0] * 3,
                                           "long_factor": [1.0] * 16, "original_max_position_embeddings": 8})
    with pytest.raises(ValueError, match="rotary_dim"):
        compute_cos_sin_cache(32, 33, 16, {"rope_type": "default", "rope_theta": 1.0})


def test_yarn_attention_factor_is_folded_into_the_cache():
    rope = ROPES["yarn"]
    cache = compute_cos_sin_cache(32, 32, MAX_POS, rope)
    mscale = 0.1 * math.log(4.0) + 1.0
    # position 0: cos = mscale, sin = 0
    torch.testing.assert_close(cache[0, :16], torch.full((16,), mscale), rtol=1e-6, atol=0)
