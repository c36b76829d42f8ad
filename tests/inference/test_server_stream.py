"""`kat serve` with `stream: true`: `pytest tests/inference/test_server_stream.py`.

Model-free first: `settled_think` against `parse_lenient` on every prefix of random and mutated
AutoThink texts, and `StreamResponse` fed token by token with the engine's stop rules, against
the non-streamed `OpenAIProtocol.response` of the same completions (completions, chat, chat with
the autothink parser; multi-byte characters split across tokens, stop strings, special tokens).
Then one real server (`kat serve --nproc 2 --reasoning-parser autothink`, the tiny model) asked
through the official `openai` client and raw httpx / sockets: every stream equals the
non-streamed answer of the same request and seed exactly (no tolerance: same tokens, same text).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kat_megatron.data.autothink import (
    ALL_TAGS,
    GENERATION_PREFIX,
    MODES,
    AutoThinkResponse,
    parse_lenient,
    render_response,
)
from kat_megatron.data.tokenizer import encode_text
from kat_megatron.inference.sampling import StopStrings
from kat_megatron.inference.server import OpenAIProtocol
from kat_megatron.inference.streaming import StreamResponse, settled_think, stop_safe
from kat_megatron.inference.types import Completion

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
import engine_worker as W  # noqa: E402

pytestmark = pytest.mark.timeout(600)
MESSAGES = [{"role": "user", "content": "What is 12 plus 7?"}]
PIECES = [*ALL_TAGS, "<", "</", "<thi", "nk>", "</think", "\n", "\n\n", " ", "a", "b c", "x\n"]


# ----------------------------------------------------------------------------- model-free
def _autothink_text(rng: random.Random) -> str:
    """GENERATION_PREFIX + a canonical answer, often mutated, or random pieces."""
    if rng.random() < 0.3:
        return GENERATION_PREFIX + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))
    mode = rng.choice(MODES)
    words = ["a", "b c", "x\ny", "<b> 1", "é日", " a", "a  ", "\nb"]
    text = render_response(AutoThinkResponse(
        judge=rng.choice(words), mode=mode, answer=rng.choice(words),
        think=rng.choice(words) if mode == "think_on" else None,
    )) + rng.choice(["", "<|im_end|>", " ", "x"])  # fmt: skip
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        i = rng.randint(0, len(text))
        text = text[:i] + rng.choice([*PIECES, ""]) + text[i + rng.randint(0, 3) :]
    return text if text.startswith(GENERATION_PREFIX) else GENERATION_PREFIX + text


def test_settled_think_is_a_prefix_of_the_final_split():
    rng = random.Random(0)
    for _ in range(3000):
        text = _autothink_text(rng)
        final = parse_lenient(text).think or ""
        sent = ""
        for k in range(len(GENERATION_PREFIX), len(text) + 1):
            now = settled_think(text[:k])
            assert final.startswith(now) and now.startswith(sent), (text[:k], now, final)
            sent = now
    # canonical reasoning is released as it is written (all of it once "\n" + "</think>" come)
    text = render_response(AutoThinkResponse("J", "think_on", "7", think="one.\n\ntwo  three"))
    at = text.index("\n</think>")
    assert settled_think(GENERATION_PREFIX + text[: at - 3]) == "one.\n\ntwo  th"
    assert settled_think(GENERATION_PREFIX + text[: at + 1]) == "one.\n\ntwo  three"


def test_stop_safe_holds_back_a_possible_stop_string():
    assert stop_safe("the cat sat", ["sat"]) == "the cat "
    assert stop_safe("the cat sa", ["sat", "x"]) == "the cat "
    assert stop_safe("the cat s", ["at", "cat s!"]) == "the "
    assert stop_safe("abc", []) == "abc" and stop_safe("abc", [""]) == "abc"


def _run(tok, proto: OpenAIProtocol, req, streams: list[list[int]], rng: random.Random):
    """The engine's decode loop on scripted tokens: (step events, completions)."""
    stops, stop_ids = StopStrings(tok, req.params.stop_strings), set(req.params.stop_token_ids)
    gen = [[] for _ in req.prompts]
    lps = [[] for _ in req.prompts]
    finish: list[str | None] = [None] * len(req.prompts)
    steps = []
    while not all(finish):
        events = []
        for b, script in enumerate(streams):
            if finish[b]:
                continue
            token = script[len(gen[b])] if len(gen[b]) < len(script) else rng.randrange(11, 512)
            gen[b].append(token)
            lps[b].append(-rng.random())
            if token in stop_ids or (stops and stops.hit(gen[b])):
                finish[b] = "stop"
            elif len(gen[b]) >= req.params.max_new_tokens:
                finish[b] = "length"
            events.append((b, token, lps[b][-1], finish[b]))
        steps.append(events)
    outs = [Completion(p, g, lp, tok.decode(g), f)
            for p, g, lp, f in zip(req.prompts, gen, lps, finish)]  # fmt: skip
    return steps, outs


def _collect(chunks: list[dict], chat: bool) -> dict[int, dict]:
    """Per choice index: concatenated text fields, log-prob entries, token ids, finish."""
    got: dict[int, dict] = {}
    for c in chunks:
        for ch in c["choices"]:
            g = got.setdefault(ch["index"], {"text": "", "content": "", "reasoning": "",
                                             "lp": [], "ids": [], "finish": None})  # fmt: skip
            delta = ch["delta"] if chat else {"content": ch["text"]}
            g["content"] += delta.get("content") or ""
            g["reasoning"] += delta.get("reasoning_content") or ""
            g["lp"] += (ch["logprobs"] or {}).get("content" if chat else "token_logprobs", [])
            g["ids"] += ch.get("token_ids", [])
            g["finish"] = g["finish"] or ch["finish_reason"]
    return got


@pytest.mark.parametrize("kind", ["completion", "chat", "chat_autothink"])
def test_stream_response_equals_response(tiny_tokenizer, kind):
    tok, rng = tiny_tokenizer, random.Random(kind)
    chat = kind != "completion"
    proto = OpenAIProtocol(tok, 512, "m", "autothink" if kind == "chat_autothink" else "none")
    pool = [*range(11, 512), *range(105, 233), 2, 7, 8]  # multi-byte pieces twice as likely
    progress = 0
    for trial in range(60):
        text = _autothink_text(rng)[len(GENERATION_PREFIX) :]
        scripts = [encode_text(tok, text), [rng.choice(pool) for _ in range(40)]]
        body = {"max_tokens": rng.choice([8, 40]), "n": 2, "seed": trial, "logprobs": True,
                "return_token_ids": True, "stream": True,
                "stream_options": {"include_usage": trial % 2 == 0}}  # fmt: skip
        if trial % 3:
            body["stop"] = [tok.decode(scripts[trial % 2][3:5]), "\n</"]
        if chat:
            body.update(messages=MESSAGES, chat_template_kwargs={"think_mode": rng.choice(
                ["auto", "think_on", "think_off"])})  # fmt: skip
        else:
            body["prompt"] = "The big horse"
        req = proto.parse(body, chat=chat)
        steps, outs = _run(tok, proto, req, scripts, rng)
        stream = StreamResponse(proto, req)
        chunks = stream.start()
        for events in steps:
            new = stream.step(events)
            progress += sum(
                1
                for c in new
                if c["choices"][0]["finish_reason"] is None
                and (c["choices"][0].get("text") or c["choices"][0].get("delta"))
            )
            chunks += new
        chunks += stream.end(outs)
        expected = proto.response(req, outs)
        assert {c["id"] for c in chunks} == {stream.id} and len({c["created"] for c in chunks}) == 1
        if req.include_usage:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == expected["usage"]
            assert all(c["usage"] is None for c in chunks[:-1])
        else:
            assert all("usage" not in c for c in chunks)
        got = _collect(chunks, chat)
        for i, choice in enumerate(expected["choices"]):
            g = got[i]
            msg = choice.get("message", {"content": choice.get("text")})
            assert g["content"] == msg["content"], (i, body)
            assert g["reasoning"] == (msg.get("reasoning_content") or "")
            assert g["finish"] == choice["finish_reason"] and g["ids"] == choice["token_ids"]
            lp = choice["logprobs"]
            assert g["lp"] == (lp["content"] if chat else lp["token_logprobs"])
        if not chat:  # text offsets continue across chunks
            offsets = [o for c in chunks for ch in c["choices"] for o in
                       ch["logprobs"]["text_offset"] if ch["index"] == 0]  # fmt: skip
            assert offsets == expected["choices"][0]["logprobs"]["text_offset"]
    assert progress > 60  # text went out before the last chunk (incremental)


# ------------------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`kat serve --nproc 2 --reasoning-parser autothink` on a free port: (base URL, log dir)."""
    ckpt = W.train_checkpoint(tmp_path_factory.mktemp("stream_ckpt"), steps=0)
    d = tmp_path_factory.mktemp("stream_serve")
    proc, url = W.start_server(
        ["--ckpt", str(ckpt), "--nproc", "2", "--max-sequence-length", "192", "--max-batch-size",
         "8", "--reasoning-parser", "autothink", "--model-name", "kat"], d)  # fmt: skip
    yield url, d
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server[0], api_key="x", max_retries=0, timeout=120) as c:
        yield c


def _post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _by_index(chunks, field) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            out[ch.index] = out.get(ch.index, "") + (field(ch) or "")
    return out


def test_completions_stream_equals_non_streamed(server, client):
    url, _ = server
    body = {"prompt": "The big horse", "max_tokens": 24, "temperature": 1.0, "seed": 3, "n": 2,
            "ignore_eos": True}  # fmt: skip
    plain = _post(url, "/completions", body)
    stop = plain["choices"][0]["text"][6:9]  # a stop string that choice 0 certainly meets
    for extra in ({}, {"stop": [stop, "zz"]}):
        expected = _post(url, "/completions", {**body, **extra, "logprobs": 1})
        chunks = list(client.completions.create(
            model="kat", stream=True, stream_options={"include_usage": True}, logprobs=1,
            prompt=body["prompt"], max_tokens=24, temperature=1.0, seed=3, n=2,
            extra_body={"ignore_eos": True}, **extra,
        ))  # fmt: skip
        assert len({c.id for c in chunks}) == 1 and {c.object for c in chunks} == {
            "text_completion"
        }
        assert (
            chunks[-1].choices == []
            and chunks[-1].usage.model_dump(exclude_none=True) == expected["usage"]
        )
        assert len([c for c in chunks if c.choices and c.choices[0].text]) > 2  # incremental
        texts = _by_index(chunks, lambda ch: ch.text)
        assert [texts[i] for i in range(2)] == [c["text"] for c in expected["choices"]]
        finish = {
            ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason
        }
        assert [finish[i] for i in range(2)] == [c["finish_reason"] for c in expected["choices"]]
        tokens = [
            t for c in chunks for ch in c.choices if ch.index == 0 for t in ch.logprobs.tokens
        ]
        assert tokens == expected["choices"][0]["logprobs"]["tokens"]
    assert expected["choices"][0]["finish_reason"] == "stop" and stop not in texts[0]


def test_chat_stream_autothink_split_equals_non_streamed(server, client):
    url, _ = server
    for mode in ("think_on", "auto"):
        body = {"messages": MESSAGES, "max_tokens": 30, "temperature": 1.0, "seed": 4, "n": 2,
                "stop": ["e "], "chat_template_kwargs": {"think_mode": mode}}  # fmt: skip
        expected = _post(url, "/chat/completions", body)
        chunks = list(client.chat.completions.create(
            model="kat", messages=MESSAGES, max_tokens=30, temperature=1.0, seed=4, n=2,
            stop=["e "], stream=True, stream_options={"include_usage": True},
            extra_body={"chat_template_kwargs": {"think_mode": mode}},
        ))  # fmt: skip
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        firsts = {}
        for c in chunks:
            for ch in c.choices:
                firsts.setdefault(ch.index, ch.delta)
        assert all(firsts[i].role == "assistant" for i in range(2))
        content = _by_index(chunks, lambda ch: ch.delta.content)
        reasoning = _by_index(chunks, lambda ch: (ch.delta.model_extra or {}).get(
            "reasoning_content"))  # fmt: skip
        for i, choice in enumerate(expected["choices"]):
            msg = choice["message"]
            assert content[i] == msg["content"]
            assert reasoning[i] == (msg["reasoning_content"] or "")
        last = [ch for c in chunks for ch in c.choices if ch.finish_reason]
        assert {ch.delta.model_extra["autothink"]["mode"] for ch in last} <= {*MODES, None}
        assert chunks[-1].usage.model_dump(exclude_none=True) == expected["usage"]
        early = [ch for c in chunks for ch in c.choices if ch.finish_reason is None
                 and (ch.delta.model_extra or {}).get("reasoning_content")]  # fmt: skip
        if mode == "think_on":  # reasoning streams as it is generated
            assert any(reasoning.values()) and len(early) > 2
        else:  # the model's free-form text is all answer; it comes with the last chunks
            assert any(content.values()) and not early


def test_raw_sse_events_done_and_errors(server):
    url, _ = server
    body = {"prompt": "The big horse", "max_tokens": 6, "seed": 1, "stream": True}
    with httpx.stream("POST", url + "/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1]) and chunks
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]
    for bad in ({"max_tokens": 0}, {"stream_options": []}, {"prompt": [10**6]}):
        r = httpx.post(url + "/completions", json={**body, **bad}, timeout=120)
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_client_leaving_mid_stream_keeps_the_server_up(server):
    url, d = server
    host, port = url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    body = json.dumps({"prompt": "The", "max_tokens": 150, "ignore_eos": True, "stream": True,
                       "temperature": 1.0}).encode()  # fmt: skip
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head + body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
    assert httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json() == {"status": "ok"}
    ok = _post(url, "/completions", {"prompt": "The", "max_tokens": 4, "seed": 2})
    assert ok["choices"][0]["finish_reason"] in ("stop", "length")
    deadline = time.monotonic() + 30
    while "client left its stream" not in (d / "out.log").read_text() + (d / "err.log").read_text():
        assert time.monotonic() < deadline, "no log line for the client that left"
        time.sleep(0.2)
