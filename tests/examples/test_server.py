"""The example completions server, through a real HTTP client against the real server on 127.0.0.1."""

from __future__ import annotations

import http.client
import importlib.util
import json
import threading
from pathlib import Path

import pytest

from accel_models import SamplingParams
from accel_models.runtime.demo import llama_config, write_checkpoint
from accel_models.runtime.llm import LLM

SERVER = Path(__file__).resolve().parents[2] / "examples" / "server" / "server.py"
TIMEOUT = 30  # seconds per HTTP call


@pytest.fixture(scope="module")
def server_mod():
    spec = importlib.util.spec_from_file_location("example_server", SERVER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("srv"), llama_config(384, max_position_embeddings=128))


@pytest.fixture(scope="module")
def server(server_mod, model_dir):
    llm = LLM(model_dir, max_num_seqs=4, kv_cache_memory=1 << 20)
    srv = server_mod.CompletionServer(llm, "127.0.0.1", 0, request_timeout=20)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(timeout=10)
    llm.shutdown()


@pytest.fixture(scope="module")
def expected(model_dir):
    """Reference outputs from a separate LLM on the same checkpoint (offline generate)."""
    with LLM(model_dir, max_num_seqs=4, kv_cache_memory=1 << 20) as llm:
        outs = llm.generate(["Hello world", "The quick brown fox"],
                            SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    return {o.prompt: o.outputs[0] for o in outs}


def post(server, body, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", "/v1/completions", body=data, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_non_streaming(server, expected):
    conn, resp = post(server, {"prompt": "Hello world", "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 200
    choice = body["choices"][0]
    assert choice["text"] == expected["Hello world"].text and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12 and body["object"] == "text_completion"


def test_streaming_concatenates_to_the_full_text(server, expected):
    conn, resp = post(server, {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0,
                               "ignore_eos": True, "stream": True})
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = []
    for line in resp:
        line = line.strip()
        if line.startswith(b"data: "):
            events.append(line[6:])
        if line == b"data: [DONE]":
            break
    conn.close()
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2  # really incremental
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["The quick brown fox"].text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_concurrent_requests(server, expected):
    results = {}

    def run(prompt):
        conn, resp = post(server, {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        results[prompt] = json.loads(resp.read())["choices"][0]["text"]
        conn.close()

    threads = [threading.Thread(target=run, args=(p,)) for p in ["Hello world", "The quick brown fox"] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert results == {p: o.text for p, o in expected.items()}


@pytest.mark.parametrize("body, raw, match", [
    ({"prompt": "", "max_tokens": 4}, None, "empty"),
    ({"prompt": "hi", "max_tokens": 0}, None, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, None, "temperature"),
    ({"prompt": [1, 100000]}, None, "vocabulary"),
    ({"prompt": 5}, None, "prompt"),
    (None, b"{not json", "Expecting"),
])
def test_bad_requests_get_400(server, body, raw, match):
    conn, resp = post(server, body, raw)
    data = json.loads(resp.read())
    conn.close()
    assert resp.status == 400 and match in data["error"]["message"]


def test_bad_streaming_request_gets_400_and_server_stays_up(server, expected):
    conn, resp = post(server, {"prompt": "", "stream": True})
    assert resp.status == 400
    resp.read()
    conn.close()
    test_non_streaming(server, expected)


def test_client_disconnect_aborts_and_frees_blocks(server):
    llm = server.engine.llm
    import socket

    n_aborted = len(server.engine.aborted)

    body = json.dumps({"prompt": "Hello world", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=TIMEOUT)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert sock.recv(100).startswith(b"HTTP/1.0 200")
    sock.close()
    # the engine notices the broken pipe at its next write, aborts, and every block comes back
    import time

    deadline = time.time() + 20
    while time.time() < deadline and (llm.has_unfinished_requests() or llm.kv.num_free_blocks != llm.num_blocks
                                      or len(server.engine.aborted) == n_aborted):
        time.sleep(0.05)
    assert not llm.has_unfinished_requests() and llm.kv.num_free_blocks == llm.num_blocks
    assert len(server.engine.aborted) == n_aborted + 1  # the handler saw the broken pipe and aborted


def test_other_routes(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
    conn.request("GET", "/v1/models")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["data"][0]["object"] == "model"
    conn.request("GET", "/nope")
    resp = conn.getresponse()
    assert resp.status == 404
    resp.read()
    conn.close()
