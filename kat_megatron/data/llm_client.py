"""A client for OpenAI-compatible endpoints (vLLM, SGLang, our own server) used by `kat data`.

`python -c "from kat_megatron.data.llm_client import *; c = LLMClient(LLMClientConfig(
base_url='http://127.0.0.1:8000/v1')); print(c.chat('MODEL', [{'role': 'user', 'content': 'hi'}]))"`

- Concurrency: at most `max_concurrency` requests in flight per client (a semaphore; callers use
  threads). The client is thread-safe.
- Retries: transport errors, timeouts, HTTP 408/409/425/429 and 5xx are retried with exponential
  backoff and jitter (a `Retry-After` header wins); other statuses fail at once.
- Cache: each successful response is stored under `cache_dir` in a file named by the sha256 of
  the request (endpoint path, JSON body, and a caller `cache_tag`), written atomically. A
  repeated request, e.g. after an interrupted pipeline restarts, is answered from disk and never
  re-sent. The base URL and API key are not part of the key (the same model served elsewhere
  answers the same request), so a cache can move between servers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kat_megatron.data.autothink import strip_reasoning

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 425, 429})


class LLMRequestError(RuntimeError):
    """A request that failed for good (non-retryable status, or retries exhausted)."""


@dataclass
class LLMClientConfig:
    """Where and how to send requests."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Endpoint root; `/chat/completions` and `/completions` are appended."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key (sent as a Bearer token when set)."""
    max_concurrency: int = 8
    """Requests in flight at once (per client)."""
    timeout_s: float = 600.0
    """Read timeout per attempt (long reasoning answers take minutes)."""
    connect_timeout_s: float = 10.0
    max_retries: int = 5
    """Attempts after the first one for retryable failures."""
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    cache_dir: str | None = None
    """Response cache directory; None disables caching."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"client.base_url={self.base_url!r}: expected http(s)://...")
        if self.max_concurrency < 1:
            raise ValueError(f"client.max_concurrency={self.max_concurrency}: expected >= 1")
        if self.max_retries < 0:
            raise ValueError(f"client.max_retries={self.max_retries}: expected >= 0")
        for name in ("timeout_s", "connect_timeout_s", "backoff_initial_s", "backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"client.{name}={getattr(self, name)}: expected > 0")


@dataclass(frozen=True)
class Completion:
    """One generated answer."""

    text: str
    """The answer (chat: an inline <think> block is split off into `reasoning`)."""
    reasoning: str | None = None
    """`reasoning_content`/`reasoning` of reasoning models (or the inline <think> block)."""
    finish_reason: str | None = None
    cached: bool = False


@dataclass
class ClientStats:
    """Counters for the summary; updated under a lock."""

    sent: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("sent", "cache_hits", "retries", "failures")}


class RequestCache:
    """sha256-keyed JSON files under `root/ab/abcdef....json`, written with temp + rename."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @staticmethod
    def key(path: str, body: dict[str, Any], tag: str = "") -> str:
        blob = json.dumps({"path": path, "body": body, "tag": tag}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._file(key).read_text(encoding="utf-8"))["response"]
        except (OSError, ValueError, KeyError):  # missing, or torn by a crash: a miss
            return None

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"request": request, "response": response}, f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _parse_choice(path: str, data: dict[str, Any], cached: bool) -> Completion:
    try:
        choice = data["choices"][0]
    except (KeyError, IndexError, TypeError) as err:
        raise LLMRequestError(f"{path}: response has no choices: {str(data)[:200]}") from err
    if "message" not in choice:  # /completions: the raw continuation, untouched
        return Completion(choice.get("text") or "", None, choice.get("finish_reason"), cached)
    msg = choice["message"] or {}
    text = msg.get("content") or ""
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning is None:
        reasoning, text = strip_reasoning(text)
    return Completion(text, reasoning, choice.get("finish_reason"), cached)


class LLMClient:
    """Thread-safe OpenAI-compatible client with a concurrency limit, retries and a disk cache."""

    def __init__(self, config: LLMClientConfig) -> None:
        self.config = config
        self.stats = ClientStats()
        self.cache = RequestCache(config.cache_dir) if config.cache_dir else None
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=config.max_concurrency)
        self._http = httpx.Client(timeout=timeout, limits=limits)
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chat(
        self, model: str, messages: list[dict[str, str]], cache_tag: str = "", **params: Any
    ) -> Completion:
        """POST /chat/completions; `params` (temperature, max_tokens, seed, ...) go in the body."""
        body = {"model": model, "messages": messages, **params}
        return self._cached("/chat/completions", body, cache_tag)

    def complete(self, model: str, prompt: str, cache_tag: str = "", **params: Any) -> Completion:
        """POST /completions with a raw prompt (e.g. a chat-template prompt plus a prefill)."""
        body = {"model": model, "prompt": prompt, **params}
        return self._cached("/completions", body, cache_tag)

    def _cached(self, path: str, body: dict[str, Any], tag: str) -> Completion:
        key = RequestCache.key(path, body, tag) if self.cache else ""
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.add(cache_hits=1)
                return _parse_choice(path, hit, cached=True)
        data = self._post(path, body)
        completion = _parse_choice(path, data, cached=False)
        if self.cache is not None:
            self.cache.put(key, body, data)
        return completion

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None and "retry-after" in response.headers:
            try:
                return min(float(response.headers["retry-after"]), self.config.backoff_max_s)
            except ValueError:
                pass
        base = min(self.config.backoff_initial_s * 2**attempt, self.config.backoff_max_s)
        return base * (0.5 + 0.5 * random.random())

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.config.base_url.rstrip("/") + path
        last = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            response = None
            with self._slots:
                self.stats.add(sent=1)
                try:
                    response = self._http.post(url, json=body, headers=self._headers)
                except httpx.HTTPError as err:  # timeouts and transport errors
                    last = f"{type(err).__name__}: {err}"
            if response is not None:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        last = f"invalid JSON in a 200 response: {response.text[:200]!r}"
                elif response.status_code in RETRY_STATUSES or response.status_code >= 500:
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
                else:
                    self.stats.add(failures=1)
                    raise LLMRequestError(
                        f"POST {url}: HTTP {response.status_code}: {response.text[:500]}"
                    )
            if attempt < self.config.max_retries:
                self.stats.add(retries=1)
                time.sleep(self._delay(attempt, response))
        self.stats.add(failures=1)
        raise LLMRequestError(
            f"POST {url}: gave up after {self.config.max_retries + 1} attempts: {last}"
        )


class ClientPool:
    """One `LLMClient` per base URL, sharing a config (and cache directory) otherwise."""

    def __init__(self, config: LLMClientConfig) -> None:
        self.config = config
        self._clients: dict[str, LLMClient] = {}
        self._lock = threading.Lock()

    def get(self, base_url: str | None = None) -> LLMClient:
        url = base_url or self.config.base_url
        with self._lock:
            if url not in self._clients:
                cfg = dataclasses.replace(self.config, base_url=url)
                self._clients[url] = LLMClient(cfg)
            return self._clients[url]

    def stats(self) -> dict[str, int]:
        """Counters summed over all clients."""
        total: dict[str, int] = {}
        for client in self._clients.values():
            for k, v in client.stats.as_dict().items():
                total[k] = total.get(k, 0) + v
        return total or ClientStats().as_dict()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
