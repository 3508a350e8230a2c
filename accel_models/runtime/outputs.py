"""Request outputs shaped like vLLM's: ``RequestOutput.outputs[0].token_ids / .text / .finish_reason``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token at one position (vLLM's ``Logprob``)."""

    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


#: Per position: token id -> Logprob (the sampled/prompt token and the top-n).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One completion of a request.

    ``finish_reason`` is None while running, then ``"stop"`` (EOS, a stop token or a stop string),
    ``"length"`` (max_tokens or max_model_len), ``"abort"``, or ``"error"`` (the request was rejected; the
    message is in :attr:`RequestOutput.error`). ``stop_reason`` is the stop token id or stop string that
    ended it (None for EOS and the other reasons), as in vLLM.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its completion so far (cumulative, as vLLM's default).

    ``error`` is set (and ``outputs[0].finish_reason == "error"``) when the request was rejected, e.g. an
    empty prompt or one longer than max_model_len given to :meth:`LLM.generate`; the other requests of
    the batch are unaffected.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
