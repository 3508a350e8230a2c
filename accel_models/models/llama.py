"""Llama (and Mistral checkpoints): the base of every family in the zoo.

vLLM's structure: ``LlamaForCausalLM`` -> ``LlamaModel`` -> ``LlamaDecoderLayer`` -> ``LlamaAttention`` /
``LlamaMLP``. Every module takes ``prefix`` (its named_modules() path). Variants override the small hooks
(``_make_mlp``, the attention's bias flags, ``_qk_norm``) instead of copying code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from accel_models.layers import (
    Attention,
    LogitsProcessor,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    get_act_and_mul,
    get_rope,
)
from accel_models.layers.utils import divide
from accel_models.models.utils import (
    WeightLoadReport,
    as_model_config,
    extract_layer_index,
    make_layers,
    maybe_prefix,
)
from accel_models.context import get_build_context, get_forward_context


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` with gate|up merged into one projection.

    The activation and the down projection are one op call (``act_and_mul_linear`` through
    ``down_proj.forward_act_and_mul``): one kernel on backends that fuse them; ``act_fn`` names the
    activation (and still computes it alone for anyone who calls it).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False, *,
                 prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, prefix=f"{prefix}.down_proj")
        self.act_fn = get_act_and_mul(hidden_act, prefix=f"{prefix}.act_fn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)  # [T, 2 I / tp]
        x, _ = self.down_proj.forward_act_and_mul(gate_up, self.act_fn.activation)
        return x


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, rotary, paged :class:`Attention`, output projection.

    The rotary is applied by :class:`Attention` (built with ``rotary_emb``), so on the paged path it is
    one op call with the KV write (``rope_and_write_kv_cache``).
    """

    def __init__(self, config: Any, *, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.layer_idx = extract_layer_index(prefix)
        tp = get_build_context().tp_group.world_size
        self.hidden_size = config.hidden_size
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        self.num_heads = divide(self.total_num_heads, tp, "num_attention_heads")
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5

        self.qkv_proj = QKVParallelLinear(self.hidden_size, self.head_dim, self.total_num_heads,
                                          self.total_num_kv_heads, bias=config.qkv_proj_bias,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim, self.hidden_size,
                                        bias=config.o_proj_bias, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, config.rotary_dim, config.max_position_embeddings,
                                   config.rope_parameters, is_neox=True, prefix=f"{prefix}.rotary_emb")
        self.attn = Attention(self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
                              prefix=f"{prefix}.attn",
                              sliding_window=config.sliding_window_for_layer(self.layer_idx),
                              rotary_emb=self.rotary_emb)

    def _qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head normalization of q and k before rotary (Qwen3); identity here."""
        return q, k

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)  # [T, (H + 2 Hk) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self._qk_norm(q, k)
        out, _ = self.o_proj(self.attn(q, k, v, positions))  # rotary inside: fused with the KV write
        return out


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))`` (residual add fused into the norms)."""

    attention_cls: ClassVar[type[nn.Module]] = LlamaAttention

    def __init__(self, config: Any, *, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.layer_idx = extract_layer_index(prefix)
        self.hidden_size = config.hidden_size
        self.self_attn = self.attention_cls(config, prefix=f"{prefix}.self_attn")
        self._make_mlp(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, prefix=f"{prefix}.input_layernorm")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                                prefix=f"{prefix}.post_attention_layernorm")

        # hook API 1.4 / 1.5: the whole layer in one op at decode steps, where the backend fuses it natively
        # (its composite declines) and this layer is the plain one the op computes
        self._decoder_layer_decode = self._whole_layer_op(get_build_context())

    def _whole_layer_op(self, ctx: Any) -> Any:
        """The backend's whole-layer op this layer calls at decode steps (``decoder_layer_decode``), or None
        (the backend has no native one, or this layer is not the one it computes). MoE families override."""
        fused = "decoder_layer_decode" not in ctx.ops.composites and self._is_plain_dense(ctx)
        return ctx.ops.decoder_layer_decode if fused else None

    def _whole_layer_feed_forward(self) -> dict[str, Any]:
        """The feed-forward keywords of :meth:`_whole_layer_op`'s op (MoE families override)."""
        return {"gate_up_weight": self.mlp.gate_up_proj.weight, "down_weight": self.mlp.down_proj.weight}

    def _is_plain_attention(self, ctx: Any) -> bool:
        """The attention half the whole-layer ops compute: Llama's attention (no q/k norm, no bias, full
        rotary, no window or soft cap, the zoo's own paged attention) on one rank, the layer's own forward."""
        attn = self.self_attn
        return (ctx.tp_group.world_size == 1 and type(self).forward is LlamaDecoderLayer.forward
                and isinstance(attn, LlamaAttention) and type(attn).forward is LlamaAttention.forward
                and type(attn)._qk_norm is LlamaAttention._qk_norm
                and attn.qkv_proj.bias is None and attn.o_proj.bias is None
                and attn.attn.impl is None and attn.attn.sliding_window is None
                and attn.attn.logits_soft_cap is None and attn.rotary_emb.rotary_dim == attn.head_dim)

    def _is_plain_dense(self, ctx: Any) -> bool:
        """The layer ``decoder_layer_decode`` computes: the plain attention and a SwiGLU MLP without bias."""
        mlp = getattr(self, "mlp", None)
        return (self._is_plain_attention(ctx) and type(self).feed_forward is LlamaDecoderLayer.feed_forward
                and isinstance(mlp, LlamaMLP) and type(mlp).forward is LlamaMLP.forward
                and mlp.act_fn.activation == "silu"
                and mlp.gate_up_proj.bias is None and mlp.down_proj.bias is None)

    def _decode_whole_layer(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                            residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole-layer op (``decoder_layer_decode``, or the MoE families' ``moe_decoder_layer_decode``)
        on a one-token-per-sequence step, or None (not such a step, or the backend declined these inputs):
        then ``forward`` runs the layer op by op."""
        ctx = get_forward_context()
        md = ctx.attn_metadata
        # one query token per sequence and no padding rows (a padded graph's extra rows are the op's to skip
        # only if the hookspec said so; it does not)
        if md is None or md.max_query_len != 1 or md.num_actual_tokens != hidden_states.shape[0]:
            return None
        attn = self.self_attn
        rope = attn.rotary_emb
        n = md.num_actual_tokens
        return self._decoder_layer_decode(
            hidden_states=hidden_states, residual=residual, positions=positions,
            input_norm_weight=self.input_layernorm.weight, qkv_weight=attn.qkv_proj.weight,
            o_weight=attn.o_proj.weight, post_norm_weight=self.post_attention_layernorm.weight,
            **self._whole_layer_feed_forward(), eps=self.input_layernorm.variance_epsilon, cos_sin_cache=rope.cos_sin_cache, num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads, head_size=attn.head_dim, rotary_dim=rope.rotary_dim,
            is_neox=rope.is_neox, scale=attn.scaling, kv_cache=ctx.kv_caches[attn.attn.prefix],
            slot_mapping=md.slot_mapping[:n], block_table=md.block_table, seq_lens=md.seq_lens,
            max_seq_len=md.max_seq_len)

    def _make_mlp(self, config: Any) -> None:
        """Build this layer's feed-forward module (MoE families override)."""
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            bias=getattr(config, "mlp_bias", False), prefix=f"{self.prefix}.mlp")

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden_states)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._decoder_layer_decode is not None:
            out = self._decode_whole_layer(positions, hidden_states, residual)
            if out is not None:
                return out
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.feed_forward(hidden_states), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm: ``forward(...)`` -> hidden states ``[T, hidden]``."""

    decoder_layer_cls: ClassVar[type[nn.Module]] = LlamaDecoderLayer

    def __init__(self, config: Any, *, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.config = config
        self.vocab_size = config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=maybe_prefix(prefix, "embed_tokens"))
        self.layers = make_layers(config.num_hidden_layers,
                                  lambda p: self.decoder_layer_cls(config, prefix=p),
                                  prefix=maybe_prefix(prefix, "layers"))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, prefix=maybe_prefix(prefix, "norm"))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if intermediate_tensors is not None:
            raise ValueError("intermediate_tensors is only for pipeline parallelism, which the zoo does not "
                             "support: run with pipeline_parallel_size=1 and pass intermediate_tensors=None")
        if inputs_embeds is not None:
            hidden_states = inputs_embeds
        elif input_ids is not None:
            hidden_states = self.embed_input_ids(input_ids)
        else:
            raise ValueError("forward needs input_ids or inputs_embeds")
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Causal LM head on :class:`LlamaModel`; loads Hugging Face checkpoints through ``load_weights``."""

    model_cls: ClassVar[type[nn.Module]] = LlamaModel
    #: fused parameter -> the checkpoint projections stored in it (in order)
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    #: (fused param name part, checkpoint name part, shard id)
    stacked_params_mapping: ClassVar[list[tuple[str, str, Any]]] = [
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
    ]
    #: checkpoint tensors that are not parameters (rotary buffers of old checkpoints)
    ignored_weights: ClassVar[re.Pattern[str]] = re.compile(r"rotary_emb\.(inv_freq|cos_cached|sin_cached)$")

    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        config = as_model_config(config)
        self.prefix = prefix
        self.config = config
        self.model = self.model_cls(config, prefix=maybe_prefix(prefix, "model"))
        if config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens.as_lm_head()  # one parameter, as in the checkpoint
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size, prefix=maybe_prefix(prefix, "logits_processor"))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids [T]`` int64, ``positions [T]`` int64 -> hidden states ``[T, hidden]``."""
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[T, hidden]`` -> ``[T, vocab_size]``."""
        return self.logits_processor(self.lm_head, hidden_states)

    # -- checkpoint loading -----------------------------------------------------------------------------

    def _rename_checkpoint_weight(self, name: str) -> str:
        """Map a checkpoint name onto this model's naming before the packed mapping (families override)."""
        return name

    def _load_special(self, report: WeightLoadReport, name: str, tensor: torch.Tensor) -> bool:
        """Load a tensor the generic mapping does not handle (MoE experts); True if handled."""
        return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face checkpoint tensors; returns the names of the parameters loaded.

        ``weights`` must be the whole checkpoint. Every tensor no parameter takes, every shape mismatch and
        every parameter left unfilled is collected and reported in one :class:`CheckpointError`.
        """
        report = WeightLoadReport(self)
        tied = self.config.tie_word_embeddings
        for ckpt_name, tensor in weights:
            if self.ignored_weights.search(ckpt_name):
                continue
            name = self._rename_checkpoint_weight(ckpt_name)
            if tied and name == maybe_prefix(self.prefix, "lm_head.weight"):
                continue  # the tied head is the embedding; a copy in the checkpoint is redundant
            if self._load_special(report, name, tensor):
                continue
            for param_part, ckpt_part, shard_id in self.stacked_params_mapping:
                if ckpt_part in name:
                    report.load(ckpt_name, name.replace(ckpt_part, param_part), tensor, shard_id)
                    break
            else:
                report.load(ckpt_name, name, tensor)
        return report.finish()


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral checkpoints: Llama with a sliding window on every layer (``config.sliding_window``)."""
