"""A small OpenAI-style completions server on accel_models' step API (standard library only).

    python examples/server/server.py MODEL_DIR [--host 127.0.0.1] [--port 8000] [--backend NAME]

    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"prompt": "Hello", "max_tokens": 16, "temperature": 0}'
    curl -N localhost:8000/v1/completions -d '{"prompt": "Hello", "max_tokens": 16, "stream": true}'

One engine thread owns the ``LLM`` and runs ``step()`` while requests are unfinished; HTTP handler threads
submit requests to it through a queue and receive each request's outputs on their own queue, so requests
arriving at any time join the running batch (continuous batching). A client that disconnects mid-stream
has its request aborted (its KV-cache blocks are freed at once).

Endpoints: ``POST /v1/completions`` (stream or not), ``GET /v1/models``, ``GET /health``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from accel_models import SamplingParams
from accel_models.runtime.llm import LLM
from accel_models.runtime.outputs import RequestOutput

MAX_BODY = 1 << 20  # bytes
#: OpenAI request fields passed to SamplingParams under the same name
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
                   "logprobs", "include_stop_str_in_output", "skip_special_tokens")


class Engine:
    """Runs the LLM's step loop on its own thread."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, queue.Queue[RequestOutput | Exception]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="accel-models-engine", daemon=True)
        self._ids = itertools.count()
        self.aborted: list[str] = []  # ids whose abort was requested (client gone, timeout, error)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)

    def submit(self, prompt: Any, params: SamplingParams) -> tuple[str, queue.Queue[RequestOutput | Exception]]:
        """Queue a request; returns its id and the queue its outputs (or its error) arrive on."""
        rid = f"cmpl-{next(self._ids)}-{int(time.time() * 1000)}"
        q: queue.Queue[RequestOutput | Exception] = queue.Queue()
        self._inbox.put(("add", (rid, prompt, params, q)))
        return rid, q

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)
        self._inbox.put(("abort", rid))

    def _drain(self, block: bool) -> None:
        while True:
            try:
                kind, arg = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                rid, prompt, params, q = arg
                try:
                    self.llm.add_request(rid, prompt, params)
                except ValueError as exc:  # bad request: only this one fails
                    q.put(exc)
                else:
                    self._streams[rid] = q
            elif kind == "abort":
                self.llm.abort(arg)
                self._streams.pop(arg, None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.llm.has_unfinished_requests())
            if not self.llm.has_unfinished_requests():
                continue
            try:
                outputs = self.llm.step()
            except Exception as exc:  # pragma: no cover - a model failure ends every running request
                for rid, q in list(self._streams.items()):
                    self.llm.abort(rid)
                    q.put(RuntimeError(f"engine step failed: {exc}"))
                self._streams.clear()
                continue
            for out in outputs:
                q = self._streams.get(out.request_id)
                if q is not None:
                    q.put(out)
                    if out.finished:
                        del self._streams[out.request_id]


class Handler(BaseHTTPRequestHandler):
    server: CompletionServer
    timeout = 60  # seconds a client may take to send its request

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        if self.server.verbose:
            super().log_message(format, *args)

    # -- helpers -------------------------------------------------------------------------------------------

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    # -- endpoints -----------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "owned_by": "accel-models"}]})
        else:
            self._error(404, f"no route {self.path}; try POST /v1/completions", "not_found")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/v1/completions":
            self._error(404, f"no route {self.path}; try POST /v1/completions", "not_found")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self._error(400 if length <= MAX_BODY else 413, f"send a JSON body of 1 to {MAX_BODY} bytes with Content-Length")
            return
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            prompt = body.get("prompt")
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
                raise ValueError("'prompt' must be a string or a list of token ids")
            if body.get("n", 1) != 1:
                raise ValueError("only n=1 is supported")
            fields = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
            if isinstance(fields.get("logprobs"), bool):
                fields["logprobs"] = 1 if fields["logprobs"] else None
            params = SamplingParams(**fields)
        except ValueError as exc:  # JSON errors and pydantic's ValidationError are ValueErrors
            self._error(400, str(exc))
            return
        rid, q = self.server.engine.submit(prompt, params)
        if body.get("stream"):
            self._stream(rid, q)
        else:
            self._complete(rid, q)

    def _next(self, q: queue.Queue[RequestOutput | Exception]) -> RequestOutput | Exception:
        try:
            return q.get(timeout=self.server.request_timeout)
        except queue.Empty:
            return TimeoutError(f"no progress in {self.server.request_timeout} s")

    def _choice(self, out: RequestOutput, text: str) -> dict[str, Any]:
        comp = out.outputs[0]
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None,
                                  "finish_reason": comp.finish_reason if out.finished else None,
                                  "stop_reason": comp.stop_reason}
        if comp.logprobs is not None:
            choice["logprobs"] = {"token_ids": comp.token_ids,
                                  "token_logprobs": [d[t].logprob for t, d in zip(comp.token_ids, comp.logprobs)],
                                  "top_logprobs": [{(lp.decoded_token or str(t)): lp.logprob for t, lp in d.items()}
                                                   for d in comp.logprobs]}
        return choice

    def _usage(self, out: RequestOutput) -> dict[str, int]:
        n_in, n_out = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def _complete(self, rid: str, q: queue.Queue[RequestOutput | Exception]) -> None:
        while True:
            item = self._next(q)
            if isinstance(item, Exception):
                self.server.engine.abort(rid)
                self._error(400 if isinstance(item, ValueError) else 500, str(item))
                return
            if item.finished:
                break
        self._json(200, {"id": rid, "object": "text_completion", "created": int(time.time()),
                         "model": self.server.model_name, "choices": [self._choice(item, item.outputs[0].text)],
                         "usage": self._usage(item)})

    def _stream(self, rid: str, q: queue.Queue[RequestOutput | Exception]) -> None:
        first = self._next(q)
        if isinstance(first, Exception):  # rejected before any output: a plain HTTP error
            self.server.engine.abort(rid)
            self._error(400 if isinstance(first, ValueError) else 500, str(first))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        sent = 0
        item: RequestOutput | Exception = first
        try:
            while True:
                if isinstance(item, Exception):
                    self._event({"error": {"message": str(item), "type": "server_error"}})
                    self.server.engine.abort(rid)
                    break
                text = item.outputs[0].text
                chunk = {"id": rid, "object": "text_completion", "created": int(time.time()),
                         "model": self.server.model_name, "choices": [self._choice(item, text[sent:])]}
                if item.finished:
                    chunk["usage"] = self._usage(item)
                if text[sent:] or item.finished:
                    self._event(chunk)
                sent = len(text)
                if item.finished:
                    break
                item = self._next(q)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.server.engine.abort(rid)  # the client went away: free its blocks now

    def _event(self, obj: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, llm: LLM, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
                 request_timeout: float = 300.0, verbose: bool = False) -> None:
        super().__init__((host, port), Handler)
        self.engine = Engine(llm).start()
        self.model_name = model_name or str(llm.model_path.name)
        self.request_timeout = request_timeout
        self.verbose = verbose

    def server_close(self) -> None:
        super().server_close()
        self.engine.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="OpenAI-style /v1/completions server on accel_models.LLM")
    ap.add_argument("model", metavar="MODEL_DIR")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--backend")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--kv-cache-memory", type=int, default=256 << 20)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    llm = LLM(args.model, backend=args.backend, max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory)
    server = CompletionServer(llm, args.host, args.port, verbose=args.verbose)
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]}/v1/completions", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        llm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
