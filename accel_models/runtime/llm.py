"""``accel_models.LLM``: vLLM's offline API (``generate``, ``score``) and a step API for custom servers.

Bad input policy (documented in the README's runtime section):

* :meth:`LLM.add_request` (step API) raises ``ValueError`` for a bad request and queues nothing: the
  caller (a server) answers that request with an error and everything else keeps running.
* :meth:`LLM.generate` validates each prompt separately: a bad prompt (empty, longer than max_model_len,
  token ids outside the vocabulary) gets a finished :class:`RequestOutput` whose ``error`` says what is
  wrong and whose ``outputs[0].finish_reason`` is ``"error"``; the other prompts of the batch are
  generated normally. Bad sampling values are rejected when the ``SamplingParams`` is built.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from accel_models.runtime.kv_cache import KVCacheManager
from accel_models.runtime.metadata import InputBuffers, MetadataBuilder
from accel_models.runtime.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from accel_models.runtime.sampler import Sampler, SamplerOutput, SamplingRow, position_logprobs
from accel_models.runtime.sampling_params import SamplingParams, default_sampling_params
from accel_models.runtime.scheduler import Request, RequestStatus, Scheduler
from accel_models.runtime.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from accel_models.backends import OpTable

logger = logging.getLogger("accel_models.runtime")

#: Default KV-cache budget: fixed and modest (not a fraction of memory), overridable with kv_cache_memory.
DEFAULT_KV_CACHE_MEMORY = 256 << 20

Prompt = str | Sequence[int]


@dataclasses.dataclass
class _Launched:
    """A step started on the device whose results the host has not processed yet."""

    plan: list[tuple[Request, int, int, int, bool, bool]]  # (request, new tokens, row, logits rows, samples, prompt pass)
    logits: torch.Tensor | None
    sample_rows: list[int]
    tokens: torch.Tensor | None = None  # the sampled ids on the device (async scheduling)
    tokens_host: torch.Tensor | None = None  # their copy on the host, complete once ``event`` is
    event: Any = None
    #: ``tokens`` are also the first rows of the device's input-ids buffer (a greedy graph wrote them)
    ids_on_device: bool = False


def _to_host_async(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying ``t`` to (pinned) host memory; returns the host tensor and an event to wait on
    (None on the CPU, where ``t`` is returned as is)."""
    from accel_models.runtime.metadata import device_event

    if t.device.type == "cpu":
        return t.clone(), None  # (a graph's output is overwritten by its next replay)
    try:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    except RuntimeError:
        host = torch.empty(t.shape, dtype=t.dtype)
    host.copy_(t, non_blocking=True)
    return host, device_event(t.device)


def _attention_layers(model: torch.nn.Module) -> list[Any]:
    from accel_models.layers.attention import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def check_stop_strings(text: str, new_char_count: int, stop: list[str],
                       include_in_output: bool) -> tuple[str, int] | None:
    """vLLM's stop-string check on the text after ``new_char_count`` new characters were appended.

    Returns ``(stop_string, truncate_to)`` where ``truncate_to`` is -1 for no truncation, or None.
    """
    if not new_char_count or not stop:
        return None
    for s in stop:
        idx = text.find(s, max(0, len(text) + 1 - new_char_count - len(s)))
        if idx == -1:
            continue
        if include_in_output:
            idx += len(s)
            if idx >= len(text):
                return s, -1
        return s, idx
    return None


class LLM:
    """A model, its paged KV cache and a continuous-batching scheduler.

    Args:
        model: a checkpoint directory (config.json + safetensors [+ tokenizer.json,
            generation_config.json]).
        backend, dtype, device: as in :func:`accel_models.load_model`; ``backend`` may also be an op table
            already bound with :func:`accel_models.resolve_ops` (per-op overrides, or a backend bound with
            ``allow_unavailable=True`` over an emulation, as the conformance kit's graph check does; with
            one rank only: tensor-parallel ranks bind their own tables by name).
        max_num_seqs: sequences in one step at most.
        max_model_len: prompt + output tokens at most per request (default: the model's
            ``max_position_embeddings``, capped to what the KV cache holds).
        block_size: tokens per KV-cache block (default: the backend's first supported size).
        kv_cache_memory: bytes for the KV caches of all layers together (default 256 MiB).
        max_num_batched_tokens: tokens in one step at most (prompts longer than this are prefilled in
            chunks). Default ``max(2048, max_num_seqs)``.
        seed: seed of the generator unseeded requests draw from (None: nondeterministic).
        tokenizer: a directory or tokenizer.json to use instead of the checkpoint's.
        tensor_parallel_size: shard the model over this many ranks (processes launched here, joined in a
            ``torch.distributed`` group on the backend's collective: gloo on CPU); this process drives
            them and gets the logits from rank 0. ``kv_cache_memory`` is then per rank. The ranks are
            spawned processes: guard the script's entry point with ``if __name__ == "__main__":``.
        enable_expert_parallel: with ``tensor_parallel_size > 1``, MoE layers hold whole experts per rank
            instead of a slice of every expert.
        enforce_eager: never use device graphs (by default pure decode steps replay graphs captured at
            start-up when the backend's ``capture_graph`` hook offers them, e.g. CUDA graphs).
        graph_batch_sizes: decode batch sizes to capture (default 1, 2, 4, 8, 16, 24, 32, 48, 64, ... up
            to ``max_num_seqs``); a decode of ``n`` sequences runs as the smallest captured size ``>= n``,
            padded, and eagerly when none is.
        async_scheduling: overlap the host's work with the device's: a pure decode step whose tokens
            can be sampled on the device (no penalties, logprobs or active min_tokens) launches the next
            decode step of the same requests before its own tokens reach the host (vLLM's async
            scheduling). The same tokens either way. Default: on when the model is not on the CPU (where
            host and device are the same cores, so nothing overlaps) and its device has events
            (``torch.Event``); True on a device without them is a ValueError.
        enable_prefix_caching: keep computed full KV-cache blocks after their request ends and give them to
            later requests whose tokens start the same way (shared system prompts, several completions of
            one prompt, multi-turn chats): their prefill skips those tokens. On by default, as in vLLM.

    Use it as a context manager or call :meth:`shutdown` (which also stops the ranks).
    """

    def __init__(
        self,
        model: str | Path,
        backend: str | OpTable | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        *,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        block_size: int | None = None,
        kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY,
        max_num_batched_tokens: int | None = None,
        seed: int | None = None,
        tokenizer: str | Path | None = None,
        kv_cache_dtype: torch.dtype | None = None,
        tensor_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        enforce_eager: bool = False,
        graph_batch_sizes: Sequence[int] | None = None,
        enable_prefix_caching: bool = True,
        async_scheduling: bool | None = None,
    ) -> None:
        self._tp: Any = None  # the TPModelRunner driving the ranks when tensor_parallel_size > 1
        self._inflight: _Launched | None = None  # a launched step not processed yet (async scheduling)
        self._closed = True
        try:
            self._setup(model, backend, dtype, device, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                        block_size=block_size, kv_cache_memory=kv_cache_memory,
                        max_num_batched_tokens=max_num_batched_tokens, seed=seed, tokenizer=tokenizer,
                        kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tensor_parallel_size,
                        enable_expert_parallel=enable_expert_parallel, enable_prefix_caching=enable_prefix_caching)
            self._setup_graphs(enforce_eager, graph_batch_sizes)
            self.async_scheduling = self._resolve_async_scheduling(async_scheduling)
            self.overlapped_steps = 0  # steps launched before the previous one's tokens reached the host
        except BaseException:
            if self._tp is not None:  # no rank outlives a failed construction
                self._tp.shutdown()
            raise

    def _setup(self, model: str | Path, backend: str | OpTable | None, dtype: str | torch.dtype | None,
               device: str | torch.device | None, *, max_num_seqs: int, max_model_len: int | None,
               block_size: int | None, kv_cache_memory: int, max_num_batched_tokens: int | None,
               seed: int | None, tokenizer: str | Path | None, kv_cache_dtype: torch.dtype | None,
               tensor_parallel_size: int, enable_expert_parallel: bool, enable_prefix_caching: bool) -> None:
        from accel_models.loader import load_model
        from accel_models.runner import ModelRunner

        if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) \
                or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}")
        if max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
        if kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory}")
        from accel_models.backends import OpTable, resolve_ops

        self.model_path = Path(model)
        if isinstance(backend, OpTable) and tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 takes a backend name, not an op table: every rank binds its "
                             f"own table, so the table's overrides would not reach them; pass {backend.backend!r}")
        self.ops = backend if isinstance(backend, OpTable) else resolve_ops(backend)
        self.tensor_parallel_size = tensor_parallel_size
        if tensor_parallel_size > 1:
            from accel_models.config import load_config
            from accel_models.distributed import TPModelRunner

            self.config = load_config(self.model_path)  # fails fast, before any rank starts
            self._tp = TPModelRunner(self.model_path, tensor_parallel_size,
                                     enable_expert_parallel=enable_expert_parallel, backend=self.ops.backend,
                                     dtype=dtype, device=device)
            self.model = None  # the weights live in the ranks
            info = self._tp.model_info()
            # This process only builds inputs and samples: its tensors stay on the CPU (logits arrive there).
            self.device = torch.device("cpu")
            self.dtype = info["dtype"]
            heads = [(kv, hs) for _, kv, hs in info["attention"]]  # rank 0's: every rank holds as many
        else:
            self.model = load_model(self.model_path, dtype=dtype, device=device, ops=self.ops)
            self.config = getattr(self.model, "config", None)
            if self.config is None:
                from accel_models.config import load_config

                self.config = load_config(self.model_path)
            param = next(self.model.parameters())
            self.device = param.device
            self.dtype = param.dtype
            heads = [(a.num_kv_heads, a.head_size) for a in _attention_layers(self.model)]
        kv_dtype = kv_cache_dtype or self.dtype

        # Size the cache from the budget and the backend's layout.
        layers = heads
        if not layers:
            raise ValueError(f"{self.model_path}: the model has no zoo Attention layers to give a KV cache")
        layouts = [self.ops.kv_cache_layout(num_kv_heads=kv, head_size=hs, dtype=kv_dtype) for kv, hs in heads]
        supported = layouts[0].block_sizes
        block_size = block_size or supported[0]
        if block_size not in supported:
            raise ValueError(f"block_size {block_size} is not supported by backend {self.ops.backend!r}; "
                             f"supported: {supported}")
        bytes_per_token = sum(lay.bytes_per_token for lay in layouts)
        num_blocks = kv_cache_memory // (bytes_per_token * block_size)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={kv_cache_memory} bytes holds no block of {block_size} tokens "
                f"({bytes_per_token * block_size} bytes per block over {len(layers)} layers); raise it"
            )
        capacity = num_blocks * block_size
        model_max = int(getattr(self.config, "max_position_embeddings", capacity))
        if max_model_len is None:
            max_model_len = min(model_max, capacity)
        elif max_model_len > capacity:
            need = -(-max_model_len // block_size) * block_size * bytes_per_token
            raise ValueError(
                f"max_model_len={max_model_len} does not fit the KV cache ({capacity} tokens in "
                f"kv_cache_memory={kv_cache_memory} bytes); raise kv_cache_memory to at least {need} "
                "or lower max_model_len"
            )
        elif max_model_len > model_max:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings "
                             f"({model_max})")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens or max(2048, max_num_seqs)
        if self.max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({max_num_seqs})")

        if self._tp is not None:
            self._tp.init_runner(num_blocks=num_blocks, block_size=block_size, kv_cache_dtype=kv_dtype,
                                 max_model_len=max_model_len)
            self.runner: Any = self._tp
        else:
            self.runner = ModelRunner(self.model, num_blocks=num_blocks, block_size=block_size,
                                      kv_cache_dtype=kv_dtype, device=self.device, max_model_len=max_model_len)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=self.max_num_batched_tokens)
        max_blocks = -(-max_model_len // block_size)
        self.buffers = InputBuffers(max_num_seqs=max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                                    max_blocks_per_seq=max_blocks, device=self.device)
        self.builder = MetadataBuilder(self.buffers, block_size)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
        self.sampler = Sampler(gen)

        tok_path = Path(tokenizer) if tokenizer is not None else self.model_path
        self.tokenizer: Tokenizer | None = None
        if tokenizer is not None or (self.model_path / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer(tok_path)
        self.generation_config = self._read_generation_config()
        self.vocab_size = int(self.config.vocab_size)
        self.eos_token_ids = self._eos_ids()
        self._counter = itertools.count()
        self._closed = False

    # -- setup helpers ---------------------------------------------------------------------------------

    def _setup_graphs(self, enforce_eager: bool, batch_sizes: Sequence[int] | None) -> None:
        """Capture decode graphs through the backend's ``capture_graph`` hook (none under TP or
        ``enforce_eager``, none when the backend offers no graphs)."""
        from accel_models.runtime.graphs import DecodeGraphs, check_batch_sizes

        self.graphs: DecodeGraphs | None = None
        #: why no decode graphs were captured although they were wanted (a declining backend or a failed
        #: capture, also logged), else None
        self.graphs_unavailable: str | None = None
        self.graph_capture_failed = False  # the backend offered graphs, but capturing the step failed
        sizes = check_batch_sizes(batch_sizes, self.max_num_seqs)
        if enforce_eager or self._tp is not None:
            return
        graphs = DecodeGraphs(self.runner, self.buffers, self.ops.capture_graph, sizes, self.max_model_len)
        graphs.capture()
        if graphs.graphs:
            self.graphs = graphs
        else:
            self.graphs_unavailable, self.graph_capture_failed = graphs.unsupported, graphs.capture_failed

    def _resolve_async_scheduling(self, requested: bool | None) -> bool:
        """Overlap pays where the host and the device run apart (default: not on the CPU). Off the CPU it
        needs device events (``torch.Event``): the host must know when a staging buffer's copy and a step's
        sampled ids are done; without them every step runs synchronously (an explicit True is an error)."""
        from accel_models.runtime.metadata import device_event

        if self.device.type == "cpu":
            return bool(requested)  # host and device are the same: nothing to wait for (tests use it)
        if requested is False:
            return False
        if device_event(self.device) is None:
            if requested:
                raise ValueError(f"async_scheduling=True needs device events (torch.Event) on {self.device}, "
                                 "which this torch does not offer for it; leave async_scheduling unset or False")
            logger.info("async scheduling off: no device events (torch.Event) on %s", self.device)
            return False
        return True

    def _read_generation_config(self) -> dict[str, Any]:
        """generation_config.json (eos/bos ids falling back to config.json's) as a dict of set fields."""
        import dataclasses

        from accel_models.loader import load_generation_config

        gc = load_generation_config(self.model_path)
        return {k: v for k, v in dataclasses.asdict(gc).items() if v not in (None, ())}

    def _eos_ids(self) -> frozenset[int]:
        """Every id that ends a completion: generation_config's eos ids (several for Llama 3) and the
        tokenizer's eos token."""
        ids = set(self.generation_config.get("eos_token_ids", ()))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's defaults overridden by generation_config.json (temperature, top_k, top_p, ...)."""
        return default_sampling_params(self.generation_config)

    # -- context manager -------------------------------------------------------------------------------

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Abort everything and release the model and the KV caches (and stop the ranks under TP)."""
        if self._closed:
            return
        try:
            self._drop_inflight()
            for rid in list(self.scheduler.requests):
                self.abort(rid)
        finally:
            self._closed = True
            if self._tp is not None:
                self._tp.shutdown()
        self.runner = None  # type: ignore[assignment]
        self.model = None  # type: ignore[assignment]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LLM was shut down; create a new one")

    # -- step API ----------------------------------------------------------------------------------------

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_path} has no tokenizer.json: pass token ids instead of text")
            if not prompt:
                raise ValueError("the prompt is empty; give at least one token")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"])
            raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        return None, self._check_ids(prompt)

    def _check_ids(self, ids: Any) -> list[int]:
        try:
            out = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise ValueError(f"a prompt must be a str or a list of int token ids, got {type(ids).__name__}") from None
        if not out:
            raise ValueError("the prompt is empty; give at least one token")
        bad = [t for t in out if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return out

    def _make_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None,
                      score: bool = False, _child: bool = False) -> Request:
        self._check_open()
        if params is None:
            params = self.get_default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be an accel_models.SamplingParams, got {type(params).__name__}")
        if params.n != 1 and not _child:
            raise ValueError(f"n={params.n}: the step API runs one completion per request; add {params.n} requests "
                             "(with different seeds if seeded) or use generate(), which does that for you")
        text, ids = self._tokenize(prompt)
        limit = self.max_model_len if score else self.max_model_len - 1
        if len(ids) > limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len={self.max_model_len} allows "
                             f"{limit}{'' if score else ' (one position is left for the first new token)'}; "
                             "shorten it or raise max_model_len")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids {params.stop_token_ids} include ids outside [0, {self.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (tokenizer.json) to produce text")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        detok = None
        if self.tokenizer is not None and params.detokenize and not score:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        req = Request(request_id=str(request_id), prompt=text, prompt_token_ids=ids, params=params,
                      max_tokens=max_tokens, eos_token_ids=self.eos_token_ids, score=score, generator=gen,
                      detokenizer=detok)
        if params.logprobs is not None:
            req.logprobs = []
            req.cumulative_logprob = 0.0
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        return req

    def add_request(self, request_id: str, prompt: Prompt, sampling_params: SamplingParams | None = None) -> None:
        """Queue a request; it joins the running batch at the next :meth:`step`.

        ``prompt``: text, a list of token ids, or ``{"prompt_token_ids": [...]}``. Raises ``ValueError``
        (nothing queued) for a bad prompt, bad parameters or a request id already in use.
        """
        self.scheduler.add(self._make_request(request_id, prompt, sampling_params))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if it is unknown)."""
        req = self.scheduler.requests.get(str(request_id))
        if req is None:
            return None
        self.scheduler.finish(req, "abort")
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    def step(self) -> list[RequestOutput]:
        """Run one model step; returns the (cumulative) output of every request that produced a token or
        finished in it."""
        return self._step(finished_only=False)

    def _step(self, finished_only: bool) -> list[RequestOutput]:
        """:meth:`step`; ``finished_only`` (the offline ``generate``) builds outputs only for requests that
        finished, sparing a copy of every running request's token lists per step.

        With async scheduling, a pure decode step whose tokens are sampled on the device is followed at
        once by the next decode step of the same requests, launched *before* this one's tokens reach the
        host (its input ids are copied on the device from this step's sampled ids); the host then
        processes this step's tokens while the device runs the next. A request that this step finishes
        (an end token, a stop string) has its row of the next step dropped. Tokens are the same as without
        overlap; only host and device time overlap."""
        self._check_open()
        cur = self._inflight
        self._inflight = None
        if cur is None:
            sched = self.scheduler.schedule()
            if not sched.items:
                return []
            cur = self._launch([(it.request, it.num_new_tokens) for it in sched.items])
        if self.async_scheduling and cur.tokens is not None:
            self._inflight = self._launch_next(cur)
        outputs = self._complete(cur, finished_only)
        nxt = self._inflight
        if nxt is not None and all(p[0].status is RequestStatus.FINISHED for p in nxt.plan):
            self._drop_inflight()  # every request of the launched step ended in this one: nothing to keep
        return outputs

    def _launch(self, scheduled: list[tuple[Request, int]], after: _Launched | None = None) -> _Launched:
        """Build the inputs of one step and start it on the device: the model and, when every sampling
        row allows it, the sampling (see :attr:`async_scheduling`). ``after``: the step whose device-side
        tokens are this one-token-per-request step's inputs (not yet on the host)."""
        if self.async_scheduling:
            self.buffers.flip()
        items = []
        sample_rows: list[int] = []  # logits row of each sampling request
        row = 0
        plan = []
        for req, n in scheduled:
            computed = req.num_computed_tokens + (1 if after is not None else 0)
            end = computed + n
            samples = end == req.num_tokens + (1 if after is not None else 0) and not req.score
            prompt_pass = (req.params.prompt_logprobs is not None or req.score) and not req.prompt_pass_done
            k = n if prompt_pass else (1 if samples else 0)
            tokens = None if after is not None else req.all_token_ids
            items.append((tokens, computed, n, self.kv.block_tables[req.request_id], k))
            plan.append((req, n, row, k, samples, prompt_pass))
            if samples:
                sample_rows.append(row + k - 1)
            row += k
        graph_size = None
        greedy_graph = False  # the step's argmax runs inside its graph (DecodeGraphs.replay_greedy)
        extra = 1 if after is not None else 0
        if self.graphs is not None and all(p[1] == 1 and p[3] == 1 and p[4] and not p[5] for p in plan):
            graph_size = self.graphs.padded_size(len(items))  # a pure decode step: replay a graph if captured
            if graph_size is None:
                self.graphs.eager_decode_steps += 1
            else:
                self.graphs.pad(len(items), graph_size)
                greedy_graph = self.graphs.has_greedy(graph_size) and all(
                    p[0].params.greedy and Sampler.on_device(p[0].params, len(p[0].output_token_ids) + extra)
                    for p in plan)
        # the previous step's greedy graph left this step's ids (same sequences, same rows) on the device
        ids_ready = after is not None and after.ids_on_device
        inputs = self.builder.build(items, keep_device_ids=ids_ready)
        if after is not None and not ids_ready:
            assert after.tokens is not None
            inputs.input_ids[: len(items)].copy_(after.tokens, non_blocking=True)
        logits = None
        tokens = None
        if greedy_graph:
            assert self.graphs is not None and graph_size is not None
            tokens = self.graphs.replay_greedy(len(items), graph_size)
        elif graph_size is not None:
            assert self.graphs is not None
            logits = self.graphs.replay(len(items), graph_size)
        elif row:
            logits = self.runner.execute(inputs.input_ids, inputs.positions, inputs.attn_metadata,
                                         inputs.logits_indices, float_logits=False)
        else:
            self.runner.execute(inputs.input_ids, inputs.positions, inputs.attn_metadata,
                                inputs.logits_indices)
        launched = _Launched(plan, logits, sample_rows)
        sampling = [p for p in plan if p[4]]
        if tokens is not None:  # sampled by the greedy graph: the same ids sample_tensor would give
            launched.tokens, launched.ids_on_device = tokens, True
            launched.tokens_host, launched.event = _to_host_async(tokens)
        elif (self.async_scheduling and sampling and logits is not None and len(sample_rows) == logits.shape[0]
                and all(Sampler.on_device(p[0].params, len(p[0].output_token_ids) + extra) for p in sampling)):
            rows = [SamplingRow(params=p[0].params, prompt_token_ids=p[0].prompt_token_ids,
                                output_token_ids=p[0].output_token_ids, generator=p[0].generator)
                    for p in sampling]
            launched.tokens = self.sampler.sample_tensor(logits, rows)
            launched.tokens_host, launched.event = _to_host_async(launched.tokens)
        return launched

    def _launch_next(self, cur: _Launched) -> _Launched | None:
        """The next decode step of ``cur``'s requests, launched before ``cur``'s tokens reach the host;
        None when that step is not certain to be what the scheduler would run (requests waiting, a
        request that ends by length, no room in the KV cache, a row the device cannot sample)."""
        reqs = [p[0] for p in cur.plan]
        if (self.scheduler.waiting or len(self.scheduler.running) != len(reqs)
                or len(reqs) > self.max_num_batched_tokens
                or not all(p[1] == 1 and p[3] == 1 and p[4] and not p[5] for p in cur.plan)):
            return None
        for req in reqs:
            # after cur: num_tokens + 1 tokens, the next step computes position num_tokens
            if (req.status is not RequestStatus.RUNNING or len(req.output_token_ids) + 1 >= req.max_tokens
                    or req.num_tokens + 1 >= self.max_model_len
                    or not self.kv.can_hold(req.request_id, req.num_tokens + 1)):
                return None
        for req in reqs:
            self.kv.allocate_slots(req.request_id, req.num_tokens + 1)
        # (the slots are the ones the scheduler would allocate for that step: nothing leaks if it is dropped)
        nxt = self._launch([(r, 1) for r in reqs], after=cur)
        self.overlapped_steps += 1
        assert nxt.tokens is not None, "on_device accepted every row, so the step samples on the device"
        return nxt

    def _drop_inflight(self) -> None:
        """Forget a launched step nobody will process (an error, an abort of everything, shutdown). Its KV
        writes land in slots its requests own (or owned): a later step rewrites them, in stream order."""
        launched, self._inflight = self._inflight, None
        if launched is not None and launched.event is not None:
            launched.event.synchronize()

    def _complete(self, cur: _Launched, finished_only: bool) -> list[RequestOutput]:
        """Bring a launched step's tokens to the host and advance its requests."""
        plan, logits, sample_rows = cur.plan, cur.logits, cur.sample_rows
        sampling = [p for p in plan if p[4]]
        new_tokens: list[int] = []
        out = None
        if cur.tokens is not None:
            if cur.event is not None:
                cur.event.synchronize()
            new_tokens = cur.tokens_host.tolist()
            out = SamplerOutput(new_tokens, [None] * len(new_tokens), [None] * len(new_tokens))
        elif sampling:
            assert logits is not None
            rows = [SamplingRow(params=p[0].params, prompt_token_ids=p[0].prompt_token_ids,
                                output_token_ids=p[0].output_token_ids, generator=p[0].generator,
                                min_tokens_mask_ids=self._min_tokens_ids(p[0])) for p in sampling]
            sel = logits if len(sample_rows) == logits.shape[0] else logits[sample_rows]
            out = self.sampler(sel, rows)
            new_tokens = out.token_ids
        outputs: list[RequestOutput] = []
        j = -1
        for req, n, r0, k, samples, prompt_pass in plan:
            if samples:
                j += 1
            if req.status is RequestStatus.FINISHED:
                continue  # ended (a stop token, an abort) after this step was launched: its row is dropped
            prev = req.num_computed_tokens
            req.num_computed_tokens += n
            self.kv.commit(req.request_id, req.all_token_ids, req.num_computed_tokens)
            if prompt_pass:
                assert logits is not None
                self._prompt_pass(req, logits[r0 : r0 + k], prev, n)
            if req.score and req.num_computed_tokens == req.num_tokens:
                self.scheduler.finish(req, "length")
                outputs.append(self._output(req))
                continue
            if not samples:
                continue
            assert out is not None
            self._append(req, new_tokens[j], out.logprobs[j], out.sampled_logprob[j])
            if not finished_only or req.status is RequestStatus.FINISHED:
                outputs.append(self._output(req))
        return outputs

    # -- step helpers --------------------------------------------------------------------------------------

    def _min_tokens_ids(self, req: Request) -> list[int]:
        p = req.params
        if p.min_tokens and len(req.output_token_ids) < p.min_tokens:
            ids = set(p.stop_token_ids)
            if not p.ignore_eos:
                ids |= req.eos_token_ids
            return sorted(ids)
        return []

    def _prompt_pass(self, req: Request, logits: torch.Tensor, start: int, n: int) -> None:
        """Logits of prompt positions ``start .. start + n - 1`` (rows of ``logits``)."""
        prompt_len = len(req.prompt_token_ids)
        if start == 0:  # (re)computed from the start, e.g. after a preemption
            req.score_logits.clear()
            if req.prompt_logprobs is not None:
                req.prompt_logprobs = [None]
        if req.score:
            req.score_logits.append(logits.float().clone())
            if start + n >= req.num_tokens:
                req.prompt_pass_done = True
            return
        lp = torch.log_softmax(logits.float(), dim=-1)
        num = int(req.params.prompt_logprobs or 0)
        assert req.prompt_logprobs is not None
        for i in range(n):
            nxt = start + i + 1
            if nxt >= prompt_len:
                break
            d, _ = position_logprobs(lp[i], req.prompt_token_ids[nxt], num)
            req.prompt_logprobs.append(self._decoded(d))
        if start + n >= prompt_len:
            req.prompt_pass_done = True

    def _decoded(self, d: PositionLogprobs) -> PositionLogprobs:
        if self.tokenizer is not None:
            for tid, lp in d.items():
                lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
        return d

    def _append(self, req: Request, token: int, lps: PositionLogprobs | None, tok_lp: float | None) -> None:
        p = req.params
        req.append_token(token)
        if lps is not None:
            assert req.logprobs is not None and req.cumulative_logprob is not None and tok_lp is not None
            req.logprobs.append(self._decoded(lps))
            req.cumulative_logprob += tok_lp
        n_out = len(req.output_token_ids)
        finish: tuple[str, int | str | None] | None = None
        stop_by_token = False
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                finish, stop_by_token = ("stop", None), True
            elif token in p.stop_token_ids:
                finish, stop_by_token = ("stop", token), True
        # Text: a stop token is not detokenized unless include_stop_str_in_output.
        if req.detokenizer is not None and not (stop_by_token and not p.include_stop_str_in_output):
            new = req.detokenizer.step(token)
            req.text = req.detokenizer.text
            if finish is None and p.stop and n_out > p.min_tokens:
                hit = check_stop_strings(req.text, len(new), p.stop, p.include_stop_str_in_output)
                if hit is not None:
                    s, cut = hit
                    if cut != -1:
                        req.text = req.text[:cut]
                    finish = ("stop", s)
        if finish is None and (n_out >= req.max_tokens or req.num_tokens >= self.max_model_len):
            finish = ("length", None)
        if finish is not None:
            self.scheduler.finish(req, finish[0], finish[1])

    def _output(self, req: Request, error: str | None = None) -> RequestOutput:
        comp = CompletionOutput(index=0, text=req.text, token_ids=list(req.output_token_ids),
                                cumulative_logprob=req.cumulative_logprob,
                                logprobs=list(req.logprobs) if req.logprobs is not None else None,
                                finish_reason=req.finish_reason, stop_reason=req.stop_reason)
        return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                             prompt_token_ids=list(req.prompt_token_ids), outputs=[comp],
                             finished=req.status is RequestStatus.FINISHED,
                             prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
                             error=error)

    # -- offline API ---------------------------------------------------------------------------------------

    def _run(self, requests: list[Request | RequestOutput],
             progress: Callable[[int, int], None] | None = None) -> list[RequestOutput]:
        ids = []
        for r in requests:
            if isinstance(r, Request):
                self.scheduler.add(r)
                ids.append(r.request_id)
        results: dict[str, RequestOutput] = {}
        pending = set(ids)
        total = len(ids)
        try:
            while pending:
                for o in self._step(finished_only=True):
                    if o.finished and o.request_id in pending:
                        results[o.request_id] = o
                        pending.discard(o.request_id)
                        if progress is not None:
                            progress(total - len(pending), total)
                if pending and not self.scheduler.has_unfinished():  # pragma: no cover - defensive
                    raise RuntimeError(f"requests {sorted(pending)[:4]} vanished from the scheduler")
        except BaseException:
            self._drop_inflight()
            for rid in pending:
                self.abort(rid)
            raise
        return [results[r.request_id] if isinstance(r, Request) else r for r in requests]

    def _error_output(self, request_id: str, prompt: Any, exc: Exception) -> RequestOutput:
        text = prompt if isinstance(prompt, str) else None
        ids = [] if isinstance(prompt, str) or not isinstance(prompt, Iterable) else [
            t for t in prompt if isinstance(t, int)]
        return RequestOutput(request_id=request_id, prompt=text, prompt_token_ids=ids,
                             outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")],
                             finished=True, error=str(exc))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate completions for ``prompts`` (a str, a list of str, a list of token ids or a list of
        lists of token ids); returns one :class:`RequestOutput` per prompt, in input order.

        ``sampling_params``: one for all prompts, or one per prompt; None takes
        :meth:`get_default_sampling_params`. ``progress(done, total)`` is called as requests finish;
        ``use_tqdm=True`` (vLLM's keyword) prints a progress line on stderr instead (no tqdm needed).
        """
        self._check_open()
        if use_tqdm and progress is None:
            import sys

            def progress(done: int, total: int) -> None:
                sys.stderr.write(f"\rgenerate: {done}/{total} requests" + ("\n" if done == total else ""))
                sys.stderr.flush()
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        reqs: list[Request | RequestOutput] = []
        groups: list[tuple[str, int]] = []  # per prompt: (request id, number of completions)
        for prompt, params in zip(prompts, params_list):
            rid = f"gen-{next(self._counter)}"
            n = params.n if isinstance(params, SamplingParams) else 1
            try:
                if n == 1:
                    reqs.append(self._make_request(rid, prompt, params))
                else:  # n completions = n requests; a seeded one gets seeds seed, seed + 1, ... (as vLLM)
                    assert isinstance(params, SamplingParams)
                    reqs.extend(self._make_request(
                        f"{rid}#{i}", prompt, params.model_copy(update={
                            "n": 1, "seed": None if params.seed is None else params.seed + i}), _child=True)
                        for i in range(n))
            except ValueError as exc:
                n = 1
                reqs.append(self._error_output(rid, prompt, exc))
            groups.append((rid, n))
        outs = self._run(reqs, progress)
        merged: list[RequestOutput] = []
        pos = 0
        for rid, n in groups:
            part = outs[pos : pos + n]
            pos += n
            if n == 1:
                merged.append(part[0])
                continue
            first = part[0]
            merged.append(RequestOutput(
                request_id=rid, prompt=first.prompt, prompt_token_ids=first.prompt_token_ids,
                outputs=[dataclasses.replace(o.outputs[0], index=i) for i, o in enumerate(part)], finished=True,
                prompt_logprobs=first.prompt_logprobs, error=first.error))
        return merged

    def chat(
        self,
        messages: Sequence[dict[str, str]] | Sequence[Sequence[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` dicts) or several, with
        the model's chat template (tokenizer_config.json's ``chat_template``; rendering needs jinja2)."""
        self._check_open()
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer.json: chat needs one")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode_chat(list(c), add_generation_prompt) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def score(self, prompt_token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-position logits (float32 ``[len, vocab]``, row ``i`` predicting token ``i + 1``) of each
        token sequence, computed through the paged-KV path (chunked and batched like generation).
        Raises ValueError for a bad sequence."""
        self._check_open()
        reqs: list[Request | RequestOutput] = [
            self._make_request(f"score-{next(self._counter)}", ids, SamplingParams(max_tokens=1), score=True)
            for ids in prompt_token_ids
        ]
        by_id = {r.request_id: r for r in reqs if isinstance(r, Request)}
        self._run(reqs)
        return [torch.cat(by_id[r.request_id].score_logits) for r in reqs if isinstance(r, Request)]


__all__ = ["DEFAULT_KV_CACHE_MEMORY", "LLM", "check_stop_strings"]
