"""Validated, normalized model configs: one pydantic model per family of Hugging Face ``config.json``.

Two formats of config.json are in the wild and both are accepted:

* transformers 4.x (most published checkpoints): ``rope_theta`` + ``rope_scaling`` (with ``"type"`` or
  ``"rope_type"``), ``torch_dtype``, ``head_dim`` often absent;
* transformers 5.x (what ``save_pretrained`` writes today): ``rope_parameters``, ``dtype``, explicit nulls.

Model code sees **one normalized form** whatever the input was:

* ``head_dim`` is an int (the family's default when absent, ``hidden_size // num_attention_heads`` when
  null or when the family has no default);
* ``num_key_value_heads`` is an int (the family's transformers default when absent: Llama
  ``num_attention_heads``, Mistral/Mixtral 8, Qwen2/Qwen3 32, Qwen2-MoE 16, Qwen3-MoE 4; and
  ``num_attention_heads`` when null);
* ``rope_parameters`` is a transformers-5-style dict: ``{"rope_type": ..., "rope_theta": float, ...}`` plus
  the type's own fields, with the values transformers would derive filled in (see :func:`normalize_rope`);
* ``dtype`` is a dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``) or None;
* ``sliding_window`` is None unless a window is in effect for at least one layer, and
  :meth:`ModelConfig.sliding_window_for_layer` says which layers use it (``layer_types`` is normalized to
  the effective per-layer kind);
* ``qkv_proj_bias`` / ``o_proj_bias`` say which attention projections carry a bias, whatever field the
  family uses for it; :meth:`ModelConfig.is_moe_layer` says which decoder layers are sparse.

Defaults of absent fields follow transformers 5.19 for each family (the numbers our parity tests compare
against). Structural sizes (vocab, hidden, intermediate, layers, heads, experts) are required: a missing one
is an error rather than a silently invented 7B shape. Unknown keys are kept (``config.some_key``), never an
error. Configs are frozen; :meth:`ModelConfig.replace` makes a re-validated copy with changes.

Entry point: :func:`load_config` (a checkpoint directory, a config.json path, or a dict) -> the family's
config, raising :class:`~accel_models.errors.ConfigError` with a message that says what to fix.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from accel_models.errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

#: dtype names accepted in config.json (``torch_dtype``/``dtype``) -> the normalized name.
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "float64": "float64", "double": "float64", "fp64": "float64",
}

#: The rope types model code implements, and the fields each one requires (beyond rope_type, rope_theta).
ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
ROPE_TYPES: tuple[str, ...] = tuple(ROPE_REQUIRED)
_ROPE_NUMBER_FIELDS = (
    "rope_theta", "factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast",
    "beta_slow", "mscale", "mscale_all_dim", "partial_rotary_factor",
)


def dtype_name(value: Any) -> str | None:
    """Normalize a dtype given as a name (``"bfloat16"``, ``"torch.float16"``) or a torch.dtype."""
    if value is None:
        return None
    text = str(value).strip()
    text = text[len("torch."):] if text.startswith("torch.") else text
    name = DTYPE_NAMES.get(text.lower())
    if name is None:
        raise ValueError(
            f"unsupported dtype {value!r}: use one of float32, bfloat16, float16, float64 "
            "(quantized dtypes are not supported)"
        )
    return name


# ----------------------------------------------------------------------------------------------------
# Rope
# ----------------------------------------------------------------------------------------------------


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def normalize_rope(
    raw: Mapping[str, Any] | None,
    *,
    rope_theta: float | None,
    default_theta: float,
    max_position_embeddings: int,
    head_dim: int,
    partial_rotary_factor: float | None = None,
    original_max_position_embeddings: int | None = None,
) -> dict[str, Any]:
    """The transformers-5-style ``rope_parameters`` dict of a config, validated.

    ``raw`` is ``rope_scaling`` (4.x) or ``rope_parameters`` (5.x); the keyword arguments are the config's
    top-level values (``rope_theta``, ``partial_rotary_factor`` and ``original_max_position_embeddings`` as
    4.x configs place them). Mirrors transformers' ``standardize_rope_params`` and fills in what
    transformers derives when computing the frequencies, so model code never re-derives it:

    * ``"type"`` becomes ``"rope_type"`` (``"default"`` when neither is given); ``rope_theta`` comes from
      the dict, else the top level, else the family's default;
    * llama3 / yarn / longrope: ``original_max_position_embeddings`` defaults to
      ``max_position_embeddings`` (a top-level ``original_max_position_embeddings`` wins, as in transformers);
    * yarn: ``factor`` (when null: ``max_position_embeddings / original``), ``beta_fast`` (32),
      ``beta_slow`` (1), ``truncate`` (True) and ``attention_factor`` (``mscale(factor, mscale) /
      mscale(factor, mscale_all_dim)`` when both are set, else ``0.1 * ln(factor) + 1``; 1 when factor <= 1);
    * longrope: ``factor`` (when null: ``max_position_embeddings / original``) and ``attention_factor``
      (``sqrt(1 + ln(factor) / ln(original))``, 1 when factor <= 1).

    Raises ValueError naming the problem (unknown rope type, a missing or non-numeric field, a longrope
    factor list of the wrong length, an odd rotary dimension).
    """
    if raw is not None and not isinstance(raw, Mapping):
        raise ValueError(f"rope_scaling/rope_parameters must be an object (a JSON dict), got {raw!r}")
    params: dict[str, Any] = dict(raw or {})
    nested = [k for k, v in params.items() if isinstance(v, Mapping)]
    if nested:
        raise ValueError(
            f"rope parameters nested per layer type ({', '.join(nested)}) are not supported by these families: "
            "give one flat dict such as {\"rope_type\": \"default\", \"rope_theta\": 10000.0}"
        )
    legacy_type = params.pop("type", None)
    rope_type = params.pop("rope_type", None) or legacy_type or "default"
    if rope_type not in ROPE_REQUIRED:
        raise ValueError(
            f"unknown rope type {rope_type!r}: supported rope types are {', '.join(ROPE_TYPES)}. "
            "Fix rope_scaling.rope_type (4.x) or rope_parameters.rope_type (5.x)."
        )
    if params.get("rope_theta") is None:
        params["rope_theta"] = rope_theta if rope_theta is not None else default_theta
    if partial_rotary_factor is not None and params.get("partial_rotary_factor") is None:
        params["partial_rotary_factor"] = partial_rotary_factor
    if rope_type in ("llama3", "yarn", "longrope"):
        if original_max_position_embeddings is not None:
            params["original_max_position_embeddings"] = original_max_position_embeddings
        elif params.get("original_max_position_embeddings") is None:
            params["original_max_position_embeddings"] = max_position_embeddings
    for key in _ROPE_NUMBER_FIELDS:
        value = params.get(key)
        if value is None:
            params.pop(key, None)  # explicit nulls mean "absent" (required ones are checked below)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"rope parameter {key!r} must be a number, got {value!r}")
        if value <= 0 and key not in ("beta_fast", "beta_slow"):
            raise ValueError(f"rope parameter {key!r} must be positive, got {value!r}")
        params[key] = float(value)
    omax = params.get("original_max_position_embeddings")
    if omax is not None:
        if isinstance(omax, bool) or not isinstance(omax, (int, float)) or omax <= 0 or int(omax) != omax:
            raise ValueError(f"rope parameter 'original_max_position_embeddings' must be a positive integer, got {omax!r}")
        params["original_max_position_embeddings"] = int(omax)
    if rope_type in ("yarn", "longrope") and params.get("factor") is None:
        params["factor"] = max_position_embeddings / params["original_max_position_embeddings"]
    missing = [k for k in ROPE_REQUIRED[rope_type] if params.get(k) is None]
    if missing:
        raise ValueError(
            f"rope type {rope_type!r} needs {', '.join(repr(m) for m in missing)} in rope_scaling/rope_parameters"
        )
    prf = params.get("partial_rotary_factor", 1.0)
    if prf > 1.0:
        raise ValueError(f"rope parameter 'partial_rotary_factor' must be in (0, 1], got {prf}")
    rotary_dim = int(head_dim * prf)
    if rotary_dim < 2 or (rotary_dim % 2 and rotary_dim == head_dim and head_dim > 4):
        raise ValueError(
            f"the rotary dimension head_dim * partial_rotary_factor = {head_dim} * {prf} = {rotary_dim} must be an "
            "even number >= 2"
        )

    if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ValueError(
            f"llama3 rope needs high_freq_factor > low_freq_factor, got {params['high_freq_factor']} <= "
            f"{params['low_freq_factor']}"
        )
    if rope_type == "yarn":
        factor = params["factor"]
        params["beta_fast"] = params.get("beta_fast") or 32.0
        params["beta_slow"] = params.get("beta_slow") or 1.0
        params["truncate"] = bool(params.get("truncate", True))
        if params.get("attention_factor") is None:
            mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                params["attention_factor"] = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                params["attention_factor"] = _yarn_mscale(factor)
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            value = params[key]
            if not isinstance(value, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in value
            ):
                raise ValueError(f"longrope {key!r} must be a list of numbers, got {value!r}")
            if len(value) != rotary_dim // 2:
                raise ValueError(
                    f"longrope {key!r} has {len(value)} entries but the rotary dimension {rotary_dim} needs "
                    f"{rotary_dim // 2} (one per frequency)"
                )
            params[key] = [float(x) for x in value]
        if params.get("attention_factor") is None:
            factor, omax = params["factor"], params["original_max_position_embeddings"]
            params["attention_factor"] = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(omax))
    return {"rope_type": rope_type, **params}


# ----------------------------------------------------------------------------------------------------
# Config models
# ----------------------------------------------------------------------------------------------------

LayerType = Literal["full_attention", "sliding_attention"]


class ModelConfig(BaseModel):
    """A decoder-only transformer's config.json (the Llama family's fields); the base of every family.

    Field names are Hugging Face's. See the module docstring for the normalization rules.
    """

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=(), validate_default=True)

    #: The HF architecture names this class parses (the first is the canonical one).
    architecture_names: ClassVar[tuple[str, ...]] = ("LlamaForCausalLM",)
    #: transformers' ``default_theta`` of the family.
    default_rope_theta: ClassVar[float] = 10000.0

    architectures: list[str] | None = None
    model_type: str | None = None

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    head_dim: int | None = Field(default=None, gt=0)

    hidden_act: str = "silu"
    max_position_embeddings: int = Field(default=2048, gt=0)
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    rope_parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None

    sliding_window: int | None = Field(default=None, ge=0)
    layer_types: list[LayerType] | None = None

    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    # -- normalization ----------------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _accept_both_formats(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise ValueError(f"a config must be a JSON object (dict), got {type(data).__name__}")
        data = dict(data)
        if "quantization_config" in data and data["quantization_config"] is not None:
            q = data["quantization_config"]
            method = q.get("quant_method", "?") if isinstance(q, Mapping) else "?"
            raise ValueError(
                f"quantized checkpoints are not supported yet (quantization_config.quant_method={method!r}): "
                "use the unquantized checkpoint"
            )
        # dtype: 5.x "dtype" wins over 4.x "torch_dtype".
        torch_dtype = data.pop("torch_dtype", None)
        if data.get("dtype") is None:
            data["dtype"] = torch_dtype
        data["dtype"] = dtype_name(data["dtype"])
        # rope: keep the raw pieces aside; normalized in the "after" validator once head_dim is known.
        rope_scaling = data.pop("rope_scaling", None)
        rope_parameters = data.pop("rope_parameters", None)
        data["rope_parameters"] = {
            "raw": rope_scaling or rope_parameters,  # 4.x rope_scaling wins, as in transformers
            "rope_theta": data.pop("rope_theta", None),
            "partial_rotary_factor": data.pop("partial_rotary_factor", None),
            "original_max_position_embeddings": data.pop("original_max_position_embeddings", None),
        }
        return cls._rename_aliases(data)

    @classmethod
    def _rename_aliases(cls, data: dict[str, Any]) -> dict[str, Any]:
        return data

    @staticmethod
    def _alias(data: dict[str, Any], canonical: str, alias: str) -> None:
        """Accept ``alias`` for ``canonical`` (refusing both with different values)."""
        if alias not in data:
            return
        value = data.pop(alias)
        if canonical in data and data[canonical] is not None and value is not None and data[canonical] != value:
            raise ValueError(f"{canonical}={data[canonical]!r} and {alias}={value!r} disagree: keep one of them")
        if data.get(canonical) is None:
            data[canonical] = value

    @model_validator(mode="after")
    def _normalize(self) -> ModelConfig:
        put = self._put
        if self.num_key_value_heads is None:
            put("num_key_value_heads", self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by num_key_value_heads "
                f"({self.num_key_value_heads}): every key/value head must serve the same number of query heads "
                "(check both fields)"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}) and head_dim is not set: set head_dim explicitly"
                )
            put("head_dim", self.hidden_size // self.num_attention_heads)
        rope = self.rope_parameters  # the raw pieces set aside by _accept_both_formats
        put("rope_parameters", normalize_rope(
            rope["raw"],
            rope_theta=rope["rope_theta"],
            default_theta=self.default_rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            head_dim=self.head_dim,
            partial_rotary_factor=rope["partial_rotary_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
        ))
        if self.architectures is None:
            put("architectures", [self.architecture_names[0]])
        elif not self.architectures:
            raise ValueError("architectures is an empty list: name the model class, e.g. [\"LlamaForCausalLM\"]")
        window = self._effective_sliding_window()
        if window is not None and window <= 0:
            window = None
        put("sliding_window", window)
        given = self.layer_types
        if given is not None and len(given) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(given)} entries but num_hidden_layers is {self.num_hidden_layers}: "
                "give one entry per layer (or remove layer_types)"
            )
        kinds = self._layer_kinds(given)
        put("layer_types", [k if window is not None else FULL_ATTENTION for k in kinds])
        self._check_family()
        return self

    def _put(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen model: only while validating

    def _effective_sliding_window(self) -> int | None:
        """The window in effect for this family (None: no layer slides). Llama: never."""
        return None

    def _layer_kinds(self, given: list[str] | None) -> list[str]:
        """Per-layer attention kind before the window check. Default: every layer slides when a window is set."""
        return [SLIDING_ATTENTION] * self.num_hidden_layers

    def _check_family(self) -> None:
        """Family-specific cross-field checks (raise ValueError)."""

    # -- what model code asks ---------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        """The HF architecture name this config was loaded for (``architectures[0]`` or the class's own)."""
        for name in self.architectures or ():
            if name in self.architecture_names:
                return name
        return self.architecture_names[0]

    @property
    def qkv_proj_bias(self) -> bool:
        """Whether q_proj / k_proj / v_proj carry a bias."""
        return self.attention_bias

    @property
    def o_proj_bias(self) -> bool:
        """Whether o_proj carries a bias."""
        return self.attention_bias

    @property
    def rotary_dim(self) -> int:
        """How many leading channels of each head are rotated (``head_dim * partial_rotary_factor``)."""
        return int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))

    def sliding_window_for_layer(self, layer_idx: int) -> int | None:
        """The sliding window (in tokens, the current one included) of decoder layer ``layer_idx``, or None."""
        self._check_layer(layer_idx)
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING_ATTENTION else None

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` has a sparse MoE block (dense families: never)."""
        self._check_layer(layer_idx)
        return False

    def _check_layer(self, layer_idx: int) -> None:
        if not 0 <= layer_idx < self.num_hidden_layers:
            raise IndexError(f"layer {layer_idx} out of range: the model has {self.num_hidden_layers} layers")

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a list (empty when unset)."""
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    def get_torch_dtype(self) -> torch.dtype | None:
        """The checkpoint's dtype as a torch.dtype (None when config.json does not say)."""
        import torch

        return None if self.dtype is None else getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """The normalized config as a JSON-able dict (transformers-5 field names, unknown keys included)."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> ModelConfig:
        """A re-validated copy with ``changes`` applied.

        Derived fields keep their normalized values unless changed too (``head_dim`` stays when
        ``hidden_size`` changes); ``layer_types`` is derived again when the layer count or window changes.
        """
        data = {**self.to_dict(), **changes}
        if "layer_types" not in changes and changes.keys() & {
            "num_hidden_layers", "use_sliding_window", "sliding_window", "max_window_layers"
        }:
            data.pop("layer_types")  # derived again from the changed fields
        return type(self).from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> ModelConfig:
        """Validate ``data`` as this family's config, raising :class:`ConfigError` with a readable message."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, cls, source)) from None


class LlamaConfig(ModelConfig):
    """LlamaForCausalLM (transformers' LlamaConfig)."""


class MistralConfig(LlamaConfig):
    """MistralForCausalLM: Llama with a sliding window on every layer (transformers' default 4096)."""

    architecture_names: ClassVar[tuple[str, ...]] = ("MistralForCausalLM",)
    num_key_value_heads: int | None = Field(default=8, gt=0)
    max_position_embeddings: int = Field(default=4096 * 32, gt=0)
    sliding_window: int | None = Field(default=4096, ge=0)

    def _effective_sliding_window(self) -> int | None:
        return self.sliding_window


class Qwen2Config(ModelConfig):
    """Qwen2ForCausalLM: q/k/v projections always carry a bias, o_proj never.

    The sliding window applies only when ``use_sliding_window``; then, unless ``layer_types`` says
    otherwise, layers ``i >= max_window_layers`` slide (transformers' rule).
    """

    architecture_names: ClassVar[tuple[str, ...]] = ("Qwen2ForCausalLM",)
    num_key_value_heads: int | None = Field(default=32, gt=0)  # transformers' default when absent
    max_position_embeddings: int = Field(default=32768, gt=0)
    use_sliding_window: bool = False
    sliding_window: int | None = Field(default=4096, ge=0)
    max_window_layers: int = Field(default=28, ge=0)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def _effective_sliding_window(self) -> int | None:
        return self.sliding_window if self.use_sliding_window else None

    def _layer_kinds(self, given: list[str] | None) -> list[str]:
        if given is not None:
            return list(given)
        return [
            SLIDING_ATTENTION if i >= self.max_window_layers else FULL_ATTENTION
            for i in range(self.num_hidden_layers)
        ]

    @property
    def qkv_proj_bias(self) -> bool:
        return True

    @property
    def o_proj_bias(self) -> bool:
        return False


class Qwen3Config(Qwen2Config):
    """Qwen3ForCausalLM: Qwen2's sliding-window rules, q/k RMSNorm, ``attention_bias`` on all four
    projections, and head_dim 128 when absent (transformers' default)."""

    architecture_names: ClassVar[tuple[str, ...]] = ("Qwen3ForCausalLM",)
    head_dim: int | None = Field(default=128, gt=0)

    # Qwen3 returns to the generic rule (``attention_bias`` on all four projections) that Qwen2 overrides.
    qkv_proj_bias = ModelConfig.qkv_proj_bias
    o_proj_bias = ModelConfig.o_proj_bias


def _check_top_k(top_k: int, num_experts: int, experts_field: str) -> None:
    if top_k > num_experts:
        raise ValueError(
            f"num_experts_per_tok ({top_k}) is larger than {experts_field} ({num_experts}): a token cannot be "
            "routed to more experts than exist"
        )


class MixtralConfig(MistralConfig):
    """MixtralForCausalLM: every layer is a sparse MoE of ``num_local_experts`` experts of size
    ``intermediate_size``, top ``num_experts_per_tok`` with softmax-then-renormalize routing.
    ``num_experts`` is accepted as an alias of ``num_local_experts``."""

    architecture_names: ClassVar[tuple[str, ...]] = ("MixtralForCausalLM",)
    default_rope_theta: ClassVar[float] = 1e6
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    sliding_window: int | None = Field(default=None, ge=0)
    num_local_experts: int = Field(gt=0)
    num_experts_per_tok: int = Field(gt=0)
    router_jitter_noise: float = 0.0

    @classmethod
    def _rename_aliases(cls, data: dict[str, Any]) -> dict[str, Any]:
        cls._alias(data, "num_local_experts", "num_experts")
        return data

    def _check_family(self) -> None:
        _check_top_k(self.num_experts_per_tok, self.num_local_experts, "num_local_experts")

    def is_moe_layer(self, layer_idx: int) -> bool:
        self._check_layer(layer_idx)
        return True


class _QwenMoeFields(BaseModel):
    """The MoE fields shared by Qwen2-MoE and Qwen3-MoE."""

    num_experts: int = Field(gt=0)
    num_experts_per_tok: int = Field(gt=0)
    moe_intermediate_size: int = Field(gt=0)
    norm_topk_prob: bool = False
    decoder_sparse_step: int = Field(default=1, gt=0)
    mlp_only_layers: list[int] = Field(default_factory=list)


class Qwen2MoeConfig(Qwen2Config, _QwenMoeFields):
    """Qwen2MoeForCausalLM: sparse layers (``is_moe_layer``) with ``num_experts`` routed experts of size
    ``moe_intermediate_size`` plus one shared expert of size ``shared_expert_intermediate_size`` gated by a
    sigmoid; the other layers are dense MLPs of ``intermediate_size``.

    Sliding window (transformers 5.19's rule when ``layer_types`` is absent): with ``use_sliding_window``,
    the even-indexed layers ``i < max_window_layers`` slide.
    """

    architecture_names: ClassVar[tuple[str, ...]] = ("Qwen2MoeForCausalLM",)
    num_key_value_heads: int | None = Field(default=16, gt=0)  # transformers' default when absent
    shared_expert_intermediate_size: int = Field(ge=0)
    qkv_bias: bool = True

    def _layer_kinds(self, given: list[str] | None) -> list[str]:
        if given is not None:
            return list(given)
        return [
            SLIDING_ATTENTION if (i + 1) % 2 and i < self.max_window_layers else FULL_ATTENTION
            for i in range(self.num_hidden_layers)
        ]

    def _check_family(self) -> None:
        _check_top_k(self.num_experts_per_tok, self.num_experts, "num_experts")

    def is_moe_layer(self, layer_idx: int) -> bool:
        self._check_layer(layer_idx)
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0

    @property
    def qkv_proj_bias(self) -> bool:
        return self.qkv_bias


class Qwen3MoeConfig(Qwen3Config, _QwenMoeFields):
    """Qwen3MoeForCausalLM: Qwen3 attention (q/k norm) with sparse layers of ``num_experts`` experts (no
    shared expert). ``num_local_experts`` (what transformers 5 writes) is accepted for ``num_experts``.
    With ``use_sliding_window`` every layer slides (transformers 5.19 ignores max_window_layers here)."""

    architecture_names: ClassVar[tuple[str, ...]] = ("Qwen3MoeForCausalLM",)
    head_dim: int | None = Field(default=None, gt=0)
    num_key_value_heads: int | None = Field(default=4, gt=0)

    @classmethod
    def _rename_aliases(cls, data: dict[str, Any]) -> dict[str, Any]:
        cls._alias(data, "num_experts", "num_local_experts")
        return data

    def _layer_kinds(self, given: list[str] | None) -> list[str]:
        return [SLIDING_ATTENTION] * self.num_hidden_layers

    def _check_family(self) -> None:
        _check_top_k(self.num_experts_per_tok, self.num_experts, "num_experts")

    def is_moe_layer(self, layer_idx: int) -> bool:
        self._check_layer(layer_idx)
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0


class DeepseekV2Config(ModelConfig):
    """DeepseekV2ForCausalLM: multi-head latent attention (MLA) and DeepSeekMoE (transformers 5.19 defaults).

    MLA: queries come from ``q_proj`` (``q_lora_rank`` null) or the low-rank ``q_a_proj`` -> RMSNorm ->
    ``q_b_proj``; keys and values from one compressed latent of ``kv_lora_rank`` (RMSNorm, ``kv_b_proj``)
    plus a rotary key part of ``qk_rope_head_dim`` shared by all heads. A query/key head is
    ``qk_nope_head_dim + qk_rope_head_dim`` wide, a value head ``v_head_dim``. ``head_dim`` is normalized to
    ``qk_rope_head_dim`` (the rotary width), as transformers does; ``num_key_value_heads`` to
    ``num_attention_heads`` (every head has its own key and value).

    MoE: layers ``i >= first_k_dense_replace`` with ``i % moe_layer_freq == 0`` route over ``n_routed_experts``
    experts of ``moe_intermediate_size`` (``topk_method``: ``greedy``, ``group_limited_greedy`` over
    ``n_group`` groups, or ``noaux_tc``: sigmoid-style choice with a per-expert correction bias, as
    DeepSeek-V3), plus ``n_shared_experts`` always-on experts as one MLP; the others are dense MLPs of
    ``intermediate_size``. ``moe_layer_freq`` is what DeepSeek's own configs carry (always 1 in published
    ones); transformers ignores it.
    """

    architecture_names: ClassVar[tuple[str, ...]] = ("DeepseekV2ForCausalLM",)
    #: whether ``rope_interleave`` is read (DeepSeek-V3); DeepSeek-V2 always interleaves the rotary pairs
    #: (GPT-J style), whatever the config says, as transformers does
    reads_rope_interleave: ClassVar[bool] = False

    q_lora_rank: int | None = Field(default=1536, gt=0)
    kv_lora_rank: int = Field(default=512, gt=0)
    qk_nope_head_dim: int = Field(default=128, ge=0)
    qk_rope_head_dim: int = Field(default=64, gt=0)
    v_head_dim: int = Field(default=128, gt=0)

    n_routed_experts: int = Field(gt=0)
    num_experts_per_tok: int = Field(gt=0)
    moe_intermediate_size: int = Field(gt=0)
    n_shared_experts: int | None = Field(default=2, ge=0)
    routed_scaling_factor: float = Field(default=1.0, gt=0)
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"] = "greedy"
    scoring_func: Literal["softmax", "sigmoid"] = "softmax"
    n_group: int | None = Field(default=None, gt=0)
    topk_group: int | None = Field(default=None, gt=0)
    norm_topk_prob: bool = False
    first_k_dense_replace: int = Field(default=0, ge=0)
    moe_layer_freq: int = Field(default=1, gt=0)
    rope_interleave: bool | None = None
    num_nextn_predict_layers: int = Field(default=0, ge=0)
    #: accel-models' own key (not transformers'): how the paged KV cache holds MLA's keys and values.
    #: ``"latent"``: the compressed latent and the rotary key, one 'head' of kv_lora_rank + qk_rope_head_dim
    #: channels per token (the backend must accept that head size); ``"expanded"``: every head's key and
    #: value; ``"auto"`` (default): latent where the backend's kv_cache_layout accepts the head size and the
    #: zoo's own attention runs (not under vLLM), else expanded.
    mla_cache: Literal["auto", "latent", "expanded"] = "auto"

    @classmethod
    def _rename_aliases(cls, data: dict[str, Any]) -> dict[str, Any]:
        # transformers' attribute names for the same fields
        cls._alias(data, "n_routed_experts", "num_experts")
        cls._alias(data, "n_routed_experts", "num_local_experts")
        cls._alias(data, "num_nextn_predict_layers", "num_mtp_layers")
        # transformers derives both (and ignores what config.json says of them)
        data["head_dim"] = data.get("qk_rope_head_dim") or cls.model_fields["qk_rope_head_dim"].default
        data["num_key_value_heads"] = None
        return data

    def _check_family(self) -> None:
        _check_top_k(self.num_experts_per_tok, self.n_routed_experts, "n_routed_experts")
        if self.rope_interleave is None or not self.reads_rope_interleave:
            self._put("rope_interleave", True)
        if self.n_shared_experts is None:
            self._put("n_shared_experts", 0)
        if self.rotary_dim != self.qk_rope_head_dim:
            raise ValueError(
                f"partial_rotary_factor is not supported with MLA: the rotary part is qk_rope_head_dim "
                f"({self.qk_rope_head_dim}) wide; remove partial_rotary_factor"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.uses_expert_groups:
            if self.n_group is None or self.topk_group is None:
                raise ValueError(f"topk_method {self.topk_method!r} needs n_group and topk_group (the expert groups "
                                 "and how many of them a token may use)")
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be a multiple of n_group "
                                 f"({self.n_group}): the experts are split into equal groups")
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group ({self.topk_group}) is larger than n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts of the topk_group "
                    f"({self.topk_group}) groups a token may use ({self.topk_group * per_group})")
            if self.topk_method == "noaux_tc" and per_group < 2:
                raise ValueError("topk_method 'noaux_tc' scores a group by its two best experts: it needs at least "
                                 f"2 experts per group (n_routed_experts {self.n_routed_experts} / n_group "
                                 f"{self.n_group})")

    @property
    def uses_expert_groups(self) -> bool:
        """Whether routing first picks ``topk_group`` of ``n_group`` expert groups."""
        return self.topk_method in ("group_limited_greedy", "noaux_tc")

    @property
    def qk_head_dim(self) -> int:
        """The width of a query/key head: ``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mla_softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under yarn (transformers)."""
        scale = self.qk_head_dim ** -0.5
        rope = self.rope_parameters
        if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
            m = _yarn_mscale(rope["factor"], rope["mscale_all_dim"])
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        self._check_layer(layer_idx)
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0


class DeepseekV3Config(DeepseekV2Config):
    """DeepseekV3ForCausalLM: DeepSeek-V2's architecture with V3's routing (transformers 5.19): sigmoid
    scores, a per-expert ``e_score_correction_bias`` for the choice (``topk_method`` ``noaux_tc``), groups
    scored by their two best experts, renormalized weights times ``routed_scaling_factor``; and
    ``rope_interleave`` (true: interleaved rotary pairs). Multi-token-prediction layers
    (``num_nextn_predict_layers``) stored after the decoder layers are not used for generation."""

    architecture_names: ClassVar[tuple[str, ...]] = ("DeepseekV3ForCausalLM",)
    reads_rope_interleave: ClassVar[bool] = True
    max_position_embeddings: int = Field(default=4096, gt=0)
    n_shared_experts: int | None = Field(default=1, ge=0)
    routed_scaling_factor: float = Field(default=2.5, gt=0)
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"] = "noaux_tc"
    scoring_func: Literal["softmax", "sigmoid"] = "sigmoid"
    n_group: int | None = Field(default=8, gt=0)
    topk_group: int | None = Field(default=4, gt=0)
    norm_topk_prob: bool = True
    first_k_dense_replace: int = Field(default=3, ge=0)
    num_nextn_predict_layers: int = Field(default=1, ge=0)
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1


#: HF architecture name -> config class.
CONFIG_CLASSES: dict[str, type[ModelConfig]] = {
    "LlamaForCausalLM": LlamaConfig,
    "MistralForCausalLM": MistralConfig,
    "Qwen2ForCausalLM": Qwen2Config,
    "Qwen3ForCausalLM": Qwen3Config,
    "MixtralForCausalLM": MixtralConfig,
    "Qwen2MoeForCausalLM": Qwen2MoeConfig,
    "Qwen3MoeForCausalLM": Qwen3MoeConfig,
    "DeepseekV2ForCausalLM": DeepseekV2Config,
    "DeepseekV3ForCausalLM": DeepseekV3Config,
}
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def config_class_for(architecture: str) -> type[ModelConfig]:
    """The config class of an HF architecture name; UnsupportedModelError lists the supported ones."""
    try:
        return CONFIG_CLASSES[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(sorted(CONFIG_CLASSES))}"
        ) from None


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike[str], what: str = "JSON") -> Any:
    """Parse a JSON file, raising ConfigError with the file, line and column of a syntax error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}:{exc.colno}: malformed {what}: {exc.msg} (line {exc.lineno}, column {exc.colno}); "
            "fix the file or re-export it with save_pretrained"
        ) from None


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | Any) -> ModelConfig:
    """Load and validate a model config.

    Args:
        source: a checkpoint directory (its ``config.json`` is read), a path to a config.json, a dict, or
            an object with ``to_dict()`` (e.g. a transformers ``PretrainedConfig``; when it has no
            ``architectures``, its ``model_type`` picks the family).

    Returns:
        the family's :class:`ModelConfig` subclass, picked by the first supported name in ``architectures``.

    Raises:
        ConfigError: the file is missing or malformed JSON (with file and line), ``architectures`` is
            missing, or a field is missing, of the wrong type or inconsistent (the message says which).
        UnsupportedModelError (a ConfigError): no architecture in the list is supported (lists those that are).
    """
    where = "config"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
            if not path.exists():
                raise ConfigError(
                    f"{path.parent}: no config.json in this directory; a checkpoint directory needs the model's "
                    "config.json next to its *.safetensors (save_pretrained writes both)"
                )
        elif not path.exists():
            raise ConfigError(f"{path}: no such file or directory")
        where = str(path)
        data = read_json(path, "config.json")
    elif isinstance(source, Mapping):
        data = source
    elif hasattr(source, "to_dict"):
        # A transformers config built in code has no `architectures` until a model saves it: its
        # model_type names the family.
        data = dict(source.to_dict())
        if not data.get("architectures") and data.get("model_type") in _MODEL_TYPE_TO_ARCH:
            data["architectures"] = [_MODEL_TYPE_TO_ARCH[data["model_type"]]]
    else:
        raise ConfigError(
            f"load_config takes a directory, a config.json path or a dict, got {type(source).__name__}"
        )
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: a config.json must hold a JSON object, got {type(data).__name__}")

    archs = data.get("architectures")
    supported = ", ".join(sorted(CONFIG_CLASSES))
    if not archs:
        hint = _MODEL_TYPE_TO_ARCH.get(str(data.get("model_type")))
        example = hint or "LlamaForCausalLM"
        raise ConfigError(
            f"{where}: 'architectures' is missing or empty, so the model class is unknown; add e.g. "
            f"\"architectures\": [\"{example}\"]. Supported architectures: {supported}"
        )
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: 'architectures' must be a list of class names, got {archs!r}")
    for arch in archs:
        if arch in CONFIG_CLASSES:
            return CONFIG_CLASSES[arch].from_dict(data, source=f"{where} ({arch})")
    raise UnsupportedModelError(
        f"{where}: architecture {', '.join(map(repr, archs))} is not supported; supported architectures: {supported}"
    )


def _format_validation_error(exc: ValidationError, cls: type[ModelConfig], source: str) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "missing":
            lines.append(f"missing required field {loc!r}: add it to config.json")
        elif loc:
            got = err.get("input")
            lines.append(f"field {loc!r}: {msg} (got {got!r})")
        else:
            lines.append(msg)
    return f"{source}: invalid {cls.__name__}:\n  - " + "\n  - ".join(lines)


__all__ = [
    "CONFIG_CLASSES",
    "ROPE_TYPES",
    "DeepseekV2Config",
    "DeepseekV3Config",
    "LlamaConfig",
    "MistralConfig",
    "MixtralConfig",
    "ModelConfig",
    "Qwen2Config",
    "Qwen2MoeConfig",
    "Qwen3Config",
    "Qwen3MoeConfig",
    "config_class_for",
    "dtype_name",
    "load_config",
    "normalize_rope",
    "read_json",
]
