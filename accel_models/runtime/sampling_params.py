"""``SamplingParams``: how to pick each new token and when to stop (vLLM's field names and semantics).

Validation happens when the object is built (pydantic): an out-of-range value is a ``ValueError``
(``pydantic.ValidationError``) that names the field and the allowed range, before any request is queued.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``).
SAMPLING_EPS = 1e-5


class SamplingParams(BaseModel):
    """Sampling parameters of one request (the subset of vLLM's ``SamplingParams`` this runtime implements).

    Order of application, as in vLLM's V1 sampler: min_tokens masks the stop tokens; repetition, then
    frequency, then presence penalties; greedy (``temperature == 0``) takes the argmax here; otherwise the
    logits are divided by the temperature, min-p, top-k and top-p masks apply, and a token is drawn.
    Logprobs are computed from the raw model logits (vLLM's default ``logprobs_mode``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n: int = Field(default=1, description="completions per prompt (LLM.generate; the step API takes n=1)")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0,
                                    description="subtracted once from the logit of every token already generated")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0,
                                     description="subtracted from a token's logit once per time it was generated")
    repetition_penalty: float = Field(default=1.0, gt=0.0,
                                      description="> 1 discourages tokens of the prompt or output: positive logits "
                                                  "are divided by it, negative ones multiplied")
    temperature: float = Field(default=1.0, ge=0.0, description="0 is greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus: keep the smallest set of tokens "
                                                                   "whose probabilities sum to at least top_p")
    top_k: int = Field(default=0, ge=-1, description="keep the k most likely tokens; 0 or -1 keeps all")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0,
                         description="drop tokens whose probability is below min_p times the top probability")
    seed: int | None = Field(default=None, description="per-request seed: the same seed gives the same tokens, "
                                                       "whatever else is in the batch")
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in the text)")
    stop_token_ids: list[int] = Field(default_factory=list, description="token ids that end the completion "
                                                                        "(besides EOS)")
    ignore_eos: bool = Field(default=False, description="keep generating after EOS")
    max_tokens: int | None = Field(default=16, description="new tokens at most (None: up to max_model_len)")
    min_tokens: int = Field(default=0, ge=0, description="EOS and stop tokens are masked until this many tokens")
    logprobs: int | None = Field(default=None, ge=0, description="return the log-probabilities of this many top "
                                                                 "tokens (plus the sampled one) per position")
    prompt_logprobs: int | None = Field(default=None, ge=0,
                                        description="same for the prompt positions (the first is None)")
    detokenize: bool = Field(default=True, description="produce text (stop strings need it)")
    skip_special_tokens: bool = Field(default=True, description="leave special tokens out of the text")
    spaces_between_special_tokens: bool = Field(default=True, description="accepted for vLLM compatibility")
    include_stop_str_in_output: bool = Field(default=False, description="keep the matched stop string in the text")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids(cls, v: Any) -> Any:
        return [] if v is None else v

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative_ids(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {v}")
        return v

    @field_validator("n")
    @classmethod
    def _n_is_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"n must be at least 1, got {v}")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _positive_max_tokens(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"max_tokens must be at least 1, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SamplingParams:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def all_stop_token_ids(self) -> set[int]:
        return set(self.stop_token_ids)


#: generation_config.json keys applied as defaults when a request gives no SamplingParams
#: (vLLM's ``generation_config="auto"``): HF name -> SamplingParams field.
GENERATION_CONFIG_DEFAULTS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def default_sampling_params(generation_config: dict[str, Any] | None) -> SamplingParams:
    """The SamplingParams a request without any gets: vLLM's defaults overridden by generation_config.json."""
    overrides: dict[str, Any] = {}
    for hf_name, field in GENERATION_CONFIG_DEFAULTS.items():
        value = (generation_config or {}).get(hf_name)
        if value is not None:
            overrides[field] = value
    if (generation_config or {}).get("do_sample") is False:
        overrides["temperature"] = 0.0  # HF's greedy decoding; vLLM ignores do_sample but its users expect this
    return SamplingParams(**overrides)
