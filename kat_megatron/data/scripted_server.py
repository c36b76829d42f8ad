"""A scripted OpenAI-compatible HTTP server on loopback, for tests and offline dry runs.

`python -c "from kat_megatron.data.scripted_server import ScriptedLLMServer as S; s = S(lambda p,
b: 'hi').start(); print(s.base_url); input()"` serves `hi` to every request until Enter.

`script(path, body)` returns the answer: a string (the content), or a dict with `content` and
optionally `reasoning_content`. The server counts what it answers (`answered`, `answered_by_key`
keyed like `RequestCache`), and can inject faults: `fail_next(n, status)`, `delay_s`, and
`block_after` (requests beyond that many hang until `release()`, then get their connection
closed unanswered; `blocked` is set when the first one arrives and `n_blocked` counts them: once
every client worker is blocked, all earlier answers have been received, a clean interruption point).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kat_megatron.utils.http import send_json

Script = Callable[[str, dict[str, Any]], "str | dict[str, Any]"]


def request_key(path: str, body: dict[str, Any]) -> str:
    """sha256 of (path, JSON body): equal for byte-for-byte repeated requests."""
    blob = json.dumps({"path": path, "body": body}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _response(path: str, body: dict[str, Any], answer: str | dict[str, Any]) -> dict[str, Any]:
    msg = {"content": answer} if isinstance(answer, str) else dict(answer)
    if path.endswith("/chat/completions"):
        choice = {"index": 0, "message": {"role": "assistant", **msg}, "finish_reason": "stop"}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": msg["content"], "finish_reason": "stop"}
        obj = "text_completion"
    return {"id": "scripted", "object": obj, "model": body.get("model"), "choices": [choice]}


class ScriptedLLMServer:
    """`with ScriptedLLMServer(script) as server: ... server.base_url ... server.answered`."""

    def __init__(self, script: Script, delay_s: float = 0.0, block_after: int | None = None):
        self.script = script
        self.delay_s = delay_s
        self.block_after = block_after
        self.answered = 0
        self.admitted = 0
        self.n_blocked = 0
        self.answered_by_key: Counter[str] = Counter()
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.blocked = threading.Event()
        self._release = threading.Event()
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next `n` requests with HTTP `status` (not counted as answered)."""
        with self._lock:
            self._failures.extend([status] * n)

    def release(self) -> None:
        """Let blocked requests go (they are closed unanswered) and stop blocking."""
        self.block_after = None
        self._release.set()

    def start(self) -> ScriptedLLMServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ScriptedLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _admit(self) -> tuple[str, int | None]:
        """('fail', status) | ('block', None) | ('serve', None), decided under the lock."""
        with self._lock:
            if self._failures:
                return "fail", self._failures.pop(0)
            if self.block_after is not None and self.admitted >= self.block_after:
                self.n_blocked += 1
                return "block", None
            self.admitted += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return "serve", None

    def _serve(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            answer = self.script(path, body)
            return 200, _response(path, body, answer)
        except Exception as err:  # a broken script is a 500, visible to the client
            return 500, {"error": {"message": f"script error: {err!r}"}}
        finally:
            with self._lock:
                self.in_flight -= 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict) -> None:
                send_json(self, status, payload)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "scripted"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                action, status = server._admit()
                if action == "fail":
                    self._send(status, {"error": {"message": f"injected HTTP {status}"}})
                    return
                if action == "block":
                    server.blocked.set()
                    server._release.wait()
                    self.close_connection = True
                    return
                status, payload = server._serve(self.path, body)
                if status == 200:  # counted before sending: the client never sees it uncounted
                    with server._lock:
                        server.answered += 1
                        server.answered_by_key[request_key(self.path, body)] += 1
                        server.bodies.append((self.path, body))
                self._send(status, payload)

        return Handler
