"""Continuous batching: which requests run in the next step, and how many of their tokens.

One step computes, under a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``):

* every running request's next tokens, oldest first: one token for a decode, the next chunk of the
  prompt for a prefill in progress (chunked prefill: a long prompt is split over several steps);
* then waiting requests, in arrival order, while budget, sequence slots and cache blocks remain.

When a running request needs a block and none is free, the most recently arrived running request is
**preempted by recompute**: its blocks are freed and it goes back to the front of the waiting queue with
its prompt and its output so far, to be prefilled again when there is room (its sampling state is kept,
so a seeded request still produces the same tokens). The engine caps ``max_model_len`` to what the cache
can hold, so a request alone always fits and preemption always makes progress.

With prefix caching (the KV manager's), a request admitted from the waiting queue first takes the cached
full blocks its tokens start with and computes only the rest (a recomputed preempted request too).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from accel_models.runtime.kv_cache import KVCacheManager

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from accel_models.runtime.outputs import PositionLogprobs
    from accel_models.runtime.sampling_params import SamplingParams
    from accel_models.runtime.tokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request's state across steps."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    #: score requests compute the logits of every prompt position and sample nothing
    score: bool = False
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None

    status: RequestStatus = RequestStatus.WAITING
    all_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    score_logits: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    #: the request's prompt logprobs / score logits were already produced (a recompute skips them)
    prompt_pass_done: bool = False

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


@dataclass
class ScheduledItem:
    request: Request
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    items: list[ScheduledItem]
    preempted: list[Request]


class Scheduler:
    """Waiting and running queues over a :class:`KVCacheManager`."""

    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use; ids must be unique among "
                             "unfinished requests")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark ``req`` finished and return its blocks to the allocator."""
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    @staticmethod
    def _may_reuse_prefix(req: Request) -> bool:
        """Score requests and ones still owing prompt logprobs need the logits of every prompt position."""
        needs_prompt_logits = req.score or (req.params.prompt_logprobs is not None and not req.prompt_pass_done)
        return not needs_prompt_logits

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        items: list[ScheduledItem] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            fits = True
            while not self.kv.can_hold(req.request_id, req.num_computed_tokens + n):
                victim = self.running.pop()  # the most recently arrived
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    fits = False
                    break
            if not fits:
                break  # req was the last running one
            self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n)
            items.append(ScheduledItem(req, n))
            budget -= n
            i += 1
        if not preempted:
            while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
                req = self.waiting[0]
                if req.num_computed_tokens == 0 and self._may_reuse_prefix(req):
                    # cached full blocks of the prompt (never the last token: its logits are needed)
                    req.num_computed_tokens = self.kv.match_prefix(req.request_id, req.all_token_ids,
                                                                   req.num_tokens - 1)
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if not self.kv.can_hold(req.request_id, req.num_computed_tokens + n):
                    self.kv.free(req.request_id)  # give the matched blocks back (they stay cached)
                    req.num_computed_tokens = 0
                    break
                self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n)
                self.waiting.popleft()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                items.append(ScheduledItem(req, n))
                budget -= n
        return SchedulerOutput(items, preempted)
