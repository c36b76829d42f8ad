"""The OpenAI-compatible client against a real HTTP server on loopback (scripted answers)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from kat_megatron.data.llm_client import LLMClient, LLMClientConfig, LLMRequestError
from kat_megatron.data.scripted_server import ScriptedLLMServer

MSG = [{"role": "user", "content": "What is 2 + 2?"}]


def _echo(path: str, body: dict) -> str | dict:
    if path.endswith("/completions") and "prompt" in body:
        return f"completed:{body['prompt'][-5:]}"
    text = body["messages"][-1]["content"]
    if text == "reason":
        return {"content": "4", "reasoning_content": "2 + 2 = 4"}
    if text == "inline":
        return "<think>\nadd them\n</think>\n\nIt is 4."
    return f"echo:{text}:{body.get('seed')}"


@pytest.fixture
def server():
    with ScriptedLLMServer(_echo) as s:
        yield s


def _client(server, tmp_path=None, **kw) -> LLMClient:
    cfg = dict(base_url=server.base_url, backoff_initial_s=0.01, backoff_max_s=0.05, timeout_s=5.0)
    if tmp_path is not None:
        cfg["cache_dir"] = str(tmp_path / "cache")
    return LLMClient(LLMClientConfig(**{**cfg, **kw}))


def test_chat_completion_and_disk_cache(server, tmp_path):
    with _client(server, tmp_path) as c:
        first = c.chat("m", MSG, seed=1)
        again = c.chat("m", MSG, seed=1)
        other = c.chat("m", MSG, seed=2)
        tagged = c.chat("m", MSG, seed=1, cache_tag="another purpose")
    assert first.text == "echo:What is 2 + 2?:1" and not first.cached
    assert again == type(first)(first.text, None, "stop", cached=True)
    assert other.text.endswith(":2") and not tagged.cached
    assert server.answered == 3 and c.stats.as_dict() == dict(
        sent=3, cache_hits=1, retries=0, failures=0
    )
    # A new client (a restarted pipeline) answers from the same cache without any request.
    with _client(server, tmp_path) as c2:
        assert c2.chat("m", MSG, seed=2).cached and server.answered == 3
    # A torn cache file (crash while writing elsewhere) is a miss, not an error.
    for f in (tmp_path / "cache").rglob("*.json"):
        f.write_text('{"respo')
    with _client(server, tmp_path) as c3:
        assert not c3.chat("m", MSG, seed=1).cached and server.answered == 4


def test_reasoning_fields_and_completions(server):
    with _client(server) as c:
        r = c.chat("m", [{"role": "user", "content": "reason"}])
        assert (r.reasoning, r.text) == ("2 + 2 = 4", "4")
        r = c.chat("m", [{"role": "user", "content": "inline"}])
        assert (r.reasoning, r.text) == ("add them", "It is 4.")
        r = c.complete("m", "<|im_start|>assistant\n<judge>\n", max_tokens=8)
        assert r.text == "completed:dge>\n"


def test_retries_with_backoff_then_success(server):
    server.fail_next(2, 503)
    server.fail_next(1, 429)
    with _client(server) as c:
        assert c.chat("m", MSG).text.startswith("echo:")
    assert c.stats.retries == 3 and c.stats.sent == 4 and server.answered == 1


def test_non_retryable_status_fails_at_once(server):
    server.fail_next(1, 400)
    with _client(server) as c, pytest.raises(LLMRequestError, match="HTTP 400"):
        c.chat("m", MSG)
    assert c.stats.sent == 1 and c.stats.failures == 1


def test_gives_up_after_max_retries(server):
    server.fail_next(5, 500)
    with _client(server, max_retries=2) as c, pytest.raises(LLMRequestError, match="3 attempts"):
        c.chat("m", MSG)
    assert c.stats.sent == 3


def test_timeouts_are_retried(server):
    server.delay_s = 0.5
    with _client(server, timeout_s=0.1, max_retries=1) as c:
        with pytest.raises(LLMRequestError, match="Timeout"):
            c.chat("m", MSG)
        assert c.stats.sent == 2
        server.delay_s = 0.0
        assert c.chat("m", MSG, seed=7).text.endswith(":7")


def test_concurrency_limit(server):
    server.delay_s = 0.1
    with _client(server, max_concurrency=2) as c, ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: c.chat("m", MSG, seed=i), range(8)))
    assert server.answered == 8 and server.max_in_flight == 2


def test_config_validation():
    with pytest.raises(ValueError, match="base_url"):
        LLMClientConfig(base_url="localhost:8000")
    with pytest.raises(ValueError, match="max_concurrency"):
        LLMClientConfig(max_concurrency=0)
