"""`kat serve` under hostile requests and load: `pytest tests/inference/test_server_abuse.py`.

One real `kat serve` subprocess (TP=1, the tiny pretraining checkpoint, small limits) on
loopback. Every attack is followed by a well-formed request that must still be answered, and the
last test checks that the process is alive and logged no failure of its serving loop. The
attacks are the classes the trust issue names: non-finite and out-of-range sampling fields,
malformed prompts (nulls, ids outside the vocabulary, lone surrogates), limits (max_tokens, n,
prompts, samples), unknown models, bad Content-Length / chunked / oversized / slow bodies, deeply
nested JSON, too many connections, and 128 concurrent clients (all answered, in few batches).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import engine_worker as W  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)
GOOD = {"prompt": "The big horse", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`kat serve` with small limits; yields (process, base URL, host, port, log dir)."""
    ckpt = W.train_checkpoint(tmp_path_factory.mktemp("abuse_ckpt"), steps=0)
    d = tmp_path_factory.mktemp("abuse")
    proc, url = W.start_server(
        ["--ckpt", str(ckpt), "--max-sequence-length", "128", "--max-batch-size", "64",
         "--model-name", "kat,alias", "--limit-max-tokens", "32", "--limit-n", "4",
         "--limit-prompts", "4", "--limit-samples", "8", "--max-body-bytes", "65536",
         "--read-timeout", "2", "--max-connections", "200"], d)  # fmt: skip
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    yield proc, url, host, int(port), d
    proc.kill()
    proc.wait()


def _post(url: str, body, path: str = "/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json"})  # fmt: skip


def _still_serving(url: str) -> None:
    r = _post(url, GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def _error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["code"] == status
    for w in words:
        assert w in err["message"], err
    return err


def _raw(host: str, port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send `data` on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection((host, port), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def test_non_finite_and_out_of_range_sampling_fields(server):
    _, url, *_ = server
    for text in (b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}'):
        _error(_post(url, text), 400, "invalid JSON")
    _error(_post(url, {**GOOD, "temperature": 10**400}), 400, "temperature")
    _error(_post(url, {**GOOD, "temperature": -1}), 400, "temperature")
    _error(_post(url, {**GOOD, "top_p": 0}), 400, "top_p")
    _error(_post(url, {**GOOD, "seed": 2**70}), 400, "seed")
    _error(_post(url, {**GOOD, "top_k": -5}), 400, "top_k")
    # a temperature so small that logits / t overflow decodes greedily, as vLLM does
    tiny = _post(url, {**GOOD, "temperature": 1e-300, "max_tokens": 8})
    greedy = _post(url, {**GOOD, "max_tokens": 8})
    assert (
        tiny.status_code == 200
        and tiny.json()["choices"][0]["text"] == (greedy.json()["choices"][0]["text"])
    )
    _still_serving(url)


def test_malformed_prompts(server):
    _, url, *_ = server
    _error(_post(url, {**GOOD, "prompt": ["a", None]}), 400, "prompt[1]")
    _error(_post(url, {**GOOD, "prompt": [[1, None]]}), 400, "prompt[0]")
    _error(_post(url, {**GOOD, "prompt": [[1, True]]}), 400, "prompt[0]")
    _error(_post(url, {**GOOD, "prompt": [[]]}), 400, "prompt[0]")
    _error(_post(url, {**GOOD, "prompt": [5, 10**9]}), 400, "token ids")
    _error(_post(url, {**GOOD, "prompt": [-1]}), 400, "token ids")
    _error(_post(url, {**GOOD, "prompt": None}), 400, "prompt")
    _error(_post(url, b'{"prompt": "\\ud800", "max_tokens": 2}'), 400, "Unicode")
    chat = {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}
    _error(_post(url, json.dumps(chat).encode(), "/chat/completions"), 400, "Unicode")
    bad = {"messages": [{"role": "user", "content": None}], "max_tokens": 2}
    _error(_post(url, bad, "/chat/completions"), 400, "content")
    _error(_post(url, {**GOOD, "stop": [None]}), 400, "stop")
    _error(_post(url, {**GOOD, "stop_token_ids": ["x"]}), 400, "stop_token_ids")
    _still_serving(url)


def test_a_bad_request_fails_alone_in_a_busy_batch(server):
    """Requests queued together are checked one by one before they join the batch: an id outside
    the vocabulary (which passes the HTTP checks) fails its own request only."""
    _, url, *_ = server
    results: dict[str, list[int]] = {"good": [], "bad": []}

    def ask(kind: str) -> None:
        prompt = [5, 6, 10**6] if kind == "bad" else "The big horse"
        results[kind].append(_post(url, {**GOOD, "prompt": prompt}).status_code)

    threads = [threading.Thread(target=ask, args=("bad" if i % 4 == 0 else "good",))
               for i in range(16)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["bad"] == [400] * 4 and results["good"] == [200] * 12


def test_limits(server):
    _, url, *_ = server
    _error(_post(url, {**GOOD, "max_tokens": 10**12}), 400, "max_tokens", "limit")
    _error(_post(url, {**GOOD, "max_tokens": 33}), 400, "max_tokens")
    assert _post(url, {**GOOD, "max_tokens": 32}).status_code == 200
    _error(_post(url, {**GOOD, "n": 5}), 400, "n:")
    _error(_post(url, {**GOOD, "prompt": ["a"] * 5}), 400, "limit")
    _error(_post(url, {**GOOD, "prompt": ["a"] * 3, "n": 3}), 400, "9 sequences")
    _error(_post(url, {**GOOD, "stop": ["x"] * 17}), 400, "stop")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}
    _error(_post(url, chat, "/chat/completions"), 400, "max_completion_tokens")
    # chat without max_tokens: the server's limit, not the context
    r = _post(url, {"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                    "return_token_ids": True, "ignore_eos": True}, "/chat/completions")  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 32
    _still_serving(url)


def test_model_names_as_vllm(server):
    _, url, *_ = server
    err = _error(_post(url, {**GOOD, "model": "gpt-4"}), 404, "gpt-4")
    assert err["param"] == "model"
    chat = {"model": "nope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _error(_post(url, chat, "/chat/completions"), 404)
    for model in ("kat", "alias", None):
        r = _post(url, {**GOOD, "model": model})
        assert r.status_code == 200 and r.json()["model"] == "kat"
    assert [m["id"] for m in httpx.get(url + "/models").json()["data"]] == ["kat"]


def test_bad_framing_gets_an_answer(server):
    _, url, host, port, _ = server
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for length, status in ((b"abc", b"400"), (b"-5", b"400"), (b"99999999999", b"413")):
        reply = _raw(host, port, head + b"Content-Length: " + length + b"\r\n\r\n{}")
        assert reply.startswith(b"HTTP/1.1 " + status), reply[:200]
        assert b'"error"' in reply
    chunked = _raw(host, port, head + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411"), chunked[:200]
    # a body shorter than announced: 408 after the read timeout (2 s), not a hung thread
    t0 = time.monotonic()
    slow = _raw(host, port, head + b'Content-Length: 100\r\n\r\n{"prompt"')
    assert slow.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 9, slow[:200]
    # an idle connection is closed after the read timeout
    with socket.create_connection((host, port), timeout=10) as s:
        t0 = time.monotonic()
        assert s.recv(100) == b"" and time.monotonic() - t0 < 9
    r = httpx.put(url + "/completions", content=b"{}", timeout=30)
    _error(r, 405, "PUT")
    _still_serving(url)


def test_deeply_nested_json(server):
    _, url, *_ = server
    _error(_post(url, b"[" * 30_000 + b"]" * 30_000), 400, "nested")
    deep = b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    _error(_post(url, deep), 400)
    _error(_post(url, b"\xff\xfe not utf-8"), 400, "invalid JSON")
    _error(_post(url, b"[1, 2]"), 400, "JSON object")
    _still_serving(url)


def test_too_many_connections_get_503_then_service_resumes(server):
    _, url, host, port, _ = server
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection((host, port), timeout=5))
        time.sleep(0.3)
        r = httpx.post(url + "/completions", json=GOOD, timeout=30)
        _error(r, 503, "connections")
    finally:
        for s in idle:
            s.close()
    time.sleep(0.5)
    _still_serving(url)
    assert httpx.get(url.removesuffix("/v1") + "/stats").json()["refused_connections"] >= 1


@pytest.mark.parametrize("clients", [32, 128])
def test_concurrent_clients_are_all_answered_in_few_batches(server, clients):
    _, url, *_ = server
    stats = url.removesuffix("/v1") + "/stats"
    before = httpx.get(stats).json()
    codes: list[int] = []
    texts: dict[int, str] = {}
    start = threading.Barrier(clients)

    def ask(i: int) -> None:
        start.wait()
        body = {"prompt": f"The {i} horse", "max_tokens": 4 + i % 3, "temperature": 0.5 * (i % 2),
                "seed": i}  # fmt: skip
        try:
            r = httpx.post(url + "/completions", json=body, timeout=120)
            codes.append(r.status_code)
            texts[i] = r.json()["choices"][0]["text"]
        except httpx.HTTPError as err:
            codes.append(repr(err))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * clients
    after = httpx.get(stats).json()
    batches = after["batches"] - before["batches"]
    assert after["requests"] - before["requests"] == clients
    # mixed temperatures and lengths share batches: far fewer batches than requests
    assert batches <= clients // 4, batches
    # each answer is what the request alone gets (per-request seeds, per-row parameters)
    for i in (0, 1, clients - 1):
        body = {"prompt": f"The {i} horse", "max_tokens": 4 + i % 3, "temperature": 0.5 * (i % 2),
                "seed": i}  # fmt: skip
        assert _post(url, body).json()["choices"][0]["text"] == texts[i]


def test_the_server_survived(server):
    proc, url, _, _, d = server
    assert proc.poll() is None
    assert httpx.get(url.removesuffix("/v1") + "/health").json() == {"status": "ok"}
    log = (d / "err.log").read_text()
    assert "a batch failed" not in log and "Traceback" not in log, log[-3000:]
