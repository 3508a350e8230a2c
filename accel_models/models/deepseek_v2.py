"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and DeepSeekMoE.

The layers are Llama's (pre-norm blocks, fused residual adds); what differs:

* **Attention (MLA).** Queries come from ``q_proj``, or from the low-rank ``q_a_proj`` -> RMSNorm ->
  ``q_b_proj``. Keys and values come from one compressed latent per token: ``kv_a_proj_with_mqa`` gives the
  latent ``c`` (``kv_lora_rank``, then RMSNorm) and a rotary key part (``qk_rope_head_dim``) that every
  head shares; ``kv_b_proj`` expands ``c`` into each head's non-rotary key part (``W_UK c``) and its value
  (``W_UV c``). The zoo attends with the same paged :class:`~accel_models.layers.Attention` as every
  family, so the model runs on every backend unchanged, in one of two cache layouts
  (``config.mla_cache``):

  - **latent** (where the backend takes the head size): MLA's own trick with the shared ops. A head's
    score ``q_nope . W_UK c + q_pe . k_pe`` is ``(W_UK^T q_nope) . c + q_pe . k_pe``, so the query becomes
    ``[q_pe | W_UK^T q_nope]`` per head and the key ``[k_pe | c]``, one key head for all query heads
    (MQA): the cache holds ``kv_lora_rank + qk_rope_head_dim`` channels per token and layer (twice: the
    value slot holds the same vector, and the attention's output over it is ``softmax . [k_pe | c]``,
    whose ``c`` part times ``W_UV`` is the head's output). DeepSeek-V2-Lite: 2 x 576 per token and layer
    instead of 16 heads x 192 x 2. Prefill attends the same way (more multiply-adds per key than the
    expanded form; the same bytes).
  - **expanded** (elsewhere, e.g. vLLM's attention or a backend whose attention stops at 256 channels):
    each head's key ``[k_pe | W_UK c]`` and value ``W_UV c``, zero-padded to one width (padding channels
    come out zero and are dropped before ``o_proj``).

  Either way a head's channels are laid out ``[rotary part | the rest]`` (a q.k product does not depend on
  the channel order as long as q and k share it), so the rotary embedding turns the leading
  ``qk_rope_head_dim`` channels in the same op call as the KV write.
* **Rotary.** DeepSeek rotates interleaved channel pairs (GPT-J style; DeepSeek-V3's ``rope_interleave``
  false: halves, as Llama), usually with yarn; under yarn the softmax scale is multiplied by
  ``mscale(factor, mscale_all_dim) ** 2`` (``config.mla_softmax_scale``).
* **MoE.** Layers ``config.is_moe_layer(i)`` route over ``n_routed_experts`` (softmax, or sigmoid with a
  per-expert correction bias for the choice; optionally limited to the best ``topk_group`` of ``n_group``
  expert groups; weights renormalized iff ``norm_topk_prob``, times ``routed_scaling_factor``) and add
  ``n_shared_experts`` always-on experts, held as one MLP. The router runs in float32, as in transformers
  and DeepSeek's reference code: its weight and the correction bias stay float32 in a 16-bit model.
* **Checkpoints.** Multi-token-prediction layers (DeepSeek-V3's ``num_nextn_predict_layers``, stored as
  ``model.layers.<num_hidden_layers + i>``) are skipped: generation does not use them.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from accel_models.context import get_build_context
from accel_models.layers import (
    Attention,
    ColumnParallelLinear,
    FusedMoE,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    get_rope,
)
from accel_models.layers.utils import divide, new_param, param_dtype
from accel_models.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from accel_models.models.mixtral import _EXPERT_ACTIVATIONS, MoEWeightsMixin
from accel_models.models.utils import WeightLoadReport, extract_layer_index

#: transformers' RMSNorm default, which DeepSeek's q_a / kv_a norms use (not config.rms_norm_eps)
_LORA_NORM_EPS = 1e-6


def router_dtype(ctx: Any) -> torch.dtype:
    """float32 in a 16-bit model (DeepSeek routes in float32), else the model's dtype (float32, float64)."""
    dtype = param_dtype(ctx)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class DeepseekV2Attention(nn.Module):
    """Multi-head latent attention over the zoo's paged :class:`Attention` (see the module docstring)."""

    def __init__(self, config: Any, *, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.layer_idx = extract_layer_index(prefix)
        tp = get_build_context().tp_group.world_size
        self.hidden_size = config.hidden_size
        self.total_num_heads = config.num_attention_heads
        self.num_heads = divide(self.total_num_heads, tp, "num_attention_heads")
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.scaling = config.mla_softmax_scale  # the same for both cache layouts: the scores are equal
        h = self.total_num_heads

        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(self.hidden_size, h * self.qk_head_dim, bias=False,
                                               prefix=f"{prefix}.q_proj")
        else:
            self.q_a_proj = ReplicatedLinear(self.hidden_size, self.q_lora_rank, bias=config.attention_bias,
                                             prefix=f"{prefix}.q_a_proj")
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=_LORA_NORM_EPS, prefix=f"{prefix}.q_a_layernorm")
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, h * self.qk_head_dim, bias=False,
                                                 prefix=f"{prefix}.q_b_proj")
        self.kv_a_proj_with_mqa = ReplicatedLinear(self.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim,
                                                   bias=config.attention_bias, prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=_LORA_NORM_EPS, prefix=f"{prefix}.kv_a_layernorm")
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim),
                                              bias=False, prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(h * self.v_head_dim, self.hidden_size, bias=config.attention_bias,
                                        prefix=f"{prefix}.o_proj")
        #: channels of the latent cache's one key head: the latent and the rotary key part
        self.latent_size = self.kv_lora_rank + self.qk_rope_head_dim
        self.latent_cache = self._use_latent_cache(config)
        if self.latent_cache:
            self.attn_head_size, kv_heads = self.latent_size, 1
        else:
            self.attn_head_size, kv_heads = max(self.qk_head_dim, self.v_head_dim), self.num_heads
        self.rotary_emb = get_rope(self.attn_head_size, self.qk_rope_head_dim, config.max_position_embeddings,
                                   config.rope_parameters, is_neox=not config.rope_interleave,
                                   prefix=f"{prefix}.rotary_emb")
        self.attn = Attention(self.num_heads, self.attn_head_size, self.scaling, num_kv_heads=kv_heads,
                              prefix=f"{prefix}.attn", rotary_emb=self.rotary_emb)

    def _use_latent_cache(self, config: Any) -> bool:
        """``config.mla_cache``, with ``auto`` resolved against the build context (see the module docstring)."""
        ctx = get_build_context()
        mode = config.mla_cache
        if mode == "expanded":
            return False
        if ctx.attention_factory is not None:  # vLLM's attention: its cache, sized per expanded head
            if mode == "latent":
                raise ValueError(f"{self.prefix}: mla_cache 'latent' needs the zoo's own paged attention; under "
                                 "vLLM the layers attend through vLLM's standard attention: use 'auto' or 'expanded'")
            return False
        try:
            ctx.ops.kv_cache_layout(num_kv_heads=1, head_size=self.latent_size, dtype=param_dtype(ctx))
        except ValueError as exc:
            if mode == "latent":
                raise ValueError(f"{self.prefix}: mla_cache 'latent' needs one KV head of kv_lora_rank + "
                                 f"qk_rope_head_dim = {self.latent_size} channels, which backend "
                                 f"{ctx.ops.backend!r} refuses ({exc}); use 'auto' or 'expanded'") from None
            return False
        return True

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, heads, d]`` -> ``[T, heads, attn_head_size]``, zeros after ``d``."""
        extra = self.attn_head_size - x.shape[-1]
        return x if extra == 0 else torch.cat((x, x.new_zeros(*x.shape[:-1], extra)), dim=-1)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        t, heads = hidden_states.shape[0], self.num_heads
        if self.q_lora_rank is None:
            q, _ = self.q_proj(hidden_states)
        else:
            q_a, _ = self.q_a_proj(hidden_states)
            q, _ = self.q_b_proj(self.q_a_layernorm(q_a))
        q_nope, q_pe = q.view(t, heads, self.qk_head_dim).split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        latent, _ = self.kv_a_proj_with_mqa(hidden_states)
        kv_c, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_c = self.kv_a_layernorm(kv_c.contiguous())
        if self.latent_cache:
            return self._forward_latent(positions, q_nope, q_pe, kv_c, k_pe)
        kv, _ = self.kv_b_proj(kv_c)
        k_nope, v = kv.view(t, heads, self.qk_nope_head_dim + self.v_head_dim).split(
            [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        # [rotary | non-rotary] per head: the rotary embedding turns the leading qk_rope_head_dim channels
        q = self._pad(torch.cat((q_pe, q_nope), dim=-1))
        k = self._pad(torch.cat((k_pe.unsqueeze(1).expand(t, heads, self.qk_rope_head_dim), k_nope), dim=-1))
        v = self._pad(v)
        out = self.attn(q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1), positions)
        out = out.view(t, heads, self.attn_head_size)[..., : self.v_head_dim].reshape(t, heads * self.v_head_dim)
        out, _ = self.o_proj(out)
        return out

    def _forward_latent(self, positions: torch.Tensor, q_nope: torch.Tensor, q_pe: torch.Tensor,
                        kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        t, heads, lora = q_nope.shape[0], self.num_heads, self.kv_lora_rank
        # kv_b_proj's rows per head: W_UK [nope, lora] then W_UV [v, lora] (this rank's heads)
        w = self.kv_b_proj.weight.view(heads, self.qk_nope_head_dim + self.v_head_dim, lora)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]
        q_lat = torch.einsum("thn,hnl->thl", q_nope, w_uk)  # the query against the latent: W_UK^T q_nope
        q = torch.cat((q_pe, q_lat), dim=-1)  # [T, heads, rope + lora]
        k = torch.cat((k_pe, kv_c), dim=-1)  # [T, rope + lora]: one key head; the value slot holds it too
        out = self.attn(q.reshape(t, -1), k, k, positions)
        o_lat = out.view(t, heads, self.latent_size)[..., self.qk_rope_head_dim :]  # softmax . c per head
        out = torch.einsum("thl,hvl->thv", o_lat, w_uv).reshape(t, heads * self.v_head_dim)
        out, _ = self.o_proj(out)
        return out


class DeepseekV2MoE(nn.Module):
    """Routed experts (``gate`` in float32 + ``experts``) plus the shared experts as one MLP."""

    def __init__(self, config: Any, *, prefix: str = "") -> None:
        super().__init__()
        ctx = get_build_context()
        if config.hidden_act not in _EXPERT_ACTIVATIONS:
            raise ValueError(f"{prefix}: hidden_act {config.hidden_act!r} is not supported for MoE experts; "
                             f"supported: {', '.join(_EXPERT_ACTIVATIONS)}")
        self.prefix = prefix
        num_experts = config.n_routed_experts
        dtype = router_dtype(ctx)
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False, params_dtype=dtype,
                                     prefix=f"{prefix}.gate")
        if config.topk_method == "noaux_tc":
            self.gate.e_score_correction_bias = new_param(ctx, num_experts, dtype=dtype)
        else:
            self.gate.e_score_correction_bias = None
        grouped = config.uses_expert_groups
        self.experts = FusedMoE(
            num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size,
            renormalize=config.norm_topk_prob, scoring_func=config.scoring_func,
            activation=_EXPERT_ACTIVATIONS[config.hidden_act],
            num_expert_group=config.n_group if grouped else None, topk_group=config.topk_group if grouped else None,
            routed_scaling_factor=config.routed_scaling_factor, prefix=f"{prefix}.experts")
        if config.n_shared_experts:
            self.shared_experts = LlamaMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                           config.hidden_act, bias=config.mlp_bias, prefix=f"{prefix}.shared_experts")
        else:
            self.shared_experts = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(hidden_states.to(self.gate.weight.dtype))  # [T, E]
        out = self.experts(hidden_states, router_logits, e_score_correction_bias=self.gate.e_score_correction_bias)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class DeepseekV2DecoderLayer(LlamaDecoderLayer):
    attention_cls: ClassVar[type[nn.Module]] = DeepseekV2Attention

    def _make_mlp(self, config: Any) -> None:
        if config.is_moe_layer(self.layer_idx):
            self.mlp = DeepseekV2MoE(config, prefix=f"{self.prefix}.mlp")
        else:
            self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                                bias=config.mlp_bias, prefix=f"{self.prefix}.mlp")


class DeepseekV2Model(LlamaModel):
    decoder_layer_cls: ClassVar[type[nn.Module]] = DeepseekV2DecoderLayer


class DeepseekV2ForCausalLM(MoEWeightsMixin, LlamaForCausalLM):
    model_cls: ClassVar[type[nn.Module]] = DeepseekV2Model
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"gate_up_proj": ["gate_proj", "up_proj"]}
    # no qkv fusion: MLA's projections load as they are named
    stacked_params_mapping: ClassVar[list[tuple[str, str, Any]]] = [
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
    ]
    #: checkpoint tensors loaded as float32 into a 16-bit model (the loader reads this)
    float32_weights: ClassVar[re.Pattern[str]] = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$")
    _layer_index = re.compile(r"(?:^|\.)layers\.(\d+)\.")

    def _load_special(self, report: WeightLoadReport, name: str, tensor: torch.Tensor) -> bool:
        m = self._layer_index.search(name)
        if m is not None:
            layer, config = int(m.group(1)), self.config
            if config.num_hidden_layers <= layer < config.num_hidden_layers + config.num_nextn_predict_layers:
                return True  # a multi-token-prediction layer: not used for generation
        return super()._load_special(report, name, tensor)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 (and R1): DeepSeek-V2's model with V3's routing, read from its config."""


__all__ = ["DeepseekV2Attention", "DeepseekV2DecoderLayer", "DeepseekV2ForCausalLM", "DeepseekV2MoE",
           "DeepseekV2Model", "DeepseekV3ForCausalLM"]
