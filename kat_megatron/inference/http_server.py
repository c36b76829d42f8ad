"""The HTTP side of `kat serve` (`kat serve --ckpt DIR --limit-n 16 --max-connections 256 ...`):
limits, request bodies, errors, and the threaded server that hands requests to the engine.

What a hostile or broken client can do, and what it gets (every answer is JSON in the OpenAI
error shape `{"error": {"message", "type", "param", "code"}}`; the server keeps serving):

| request | answer |
|---|---|
| malformed JSON, `NaN`/`Infinity` literals, nesting too deep for the parser | 400 |
| a field of the wrong type or out of range (temperature NaN, a null in a prompt list, ...) | 400 naming the field |
| `max_tokens` above `limits.max_tokens`, `n` above `limits.max_n`, more prompts than `limits.max_prompts`, prompts x n above `limits.max_samples` | 400 naming the limit |
| a `model` that is not one of the served names | 404 (as vLLM) |
| unknown route | 404; unsupported method 405 |
| `Content-Length` not a non-negative integer | 400, connection closed |
| `Transfer-Encoding` (chunked bodies) | 411, connection closed |
| a body over `limits.max_body_bytes` | 413, connection closed (the body is not read) |
| a body or request line slower than `limits.read_timeout_s`, an idle keep-alive connection | 408 or closed |
| more than `limits.max_connections` open connections | 503 to the new one, at once |

`GET /stats`: requests queued, engine batches run, sequences generated and connections refused
since start (requests / batches is the mean number of requests per batch).

The listen backlog is `limits.backlog` (the kernel caps it at `net.core.somaxconn`), so bursts
of connections queue instead of being reset. Each connection gets a thread; all requests meet
in one queue that the engine drains into a single batch (see `service`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from kat_megatron.inference.service import ServiceStopped
from kat_megatron.inference.streaming import StreamResponse, send_stream
from kat_megatron.utils.http import send_json

if TYPE_CHECKING:
    from kat_megatron.inference.service import LockstepService

log = logging.getLogger("kat")


@dataclass
class ServeLimits:
    """Bounds on what one request and the clients together may ask of `kat serve`."""

    max_tokens: int | None = None
    """Largest `max_tokens` / `max_completion_tokens`; None: the served context length."""
    max_n: int = 16
    """Largest `n` (samples per prompt)."""
    max_prompts: int = 64
    """Most prompts in one /v1/completions request."""
    max_samples: int = 256
    """Most sequences (prompts x n) one request may add to a batch."""
    max_stop: int = 16
    """Most `stop` strings (each at most 256 characters) and 256 `stop_token_ids`."""
    max_body_bytes: int = 8 << 20
    backlog: int = 1024
    """listen(2) backlog: connections the kernel queues before accepting."""
    read_timeout_s: float = 30.0
    """Socket timeout while reading a request (and writing a stream to a client that stalls)."""
    max_connections: int = 512
    """Open connections served at once (one thread each); more get 503."""

    def __post_init__(self) -> None:
        for name in ("max_n", "max_prompts", "max_samples", "max_stop", "max_body_bytes",
                     "backlog", "max_connections"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name}: expected >= 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"limits.max_tokens: expected >= 1 or None, got {self.max_tokens}")
        if not self.read_timeout_s > 0:
            raise ValueError(f"limits.read_timeout_s: expected > 0, got {self.read_timeout_s}")


class HttpError(ValueError):
    """A client error answered with `status` (4xx) in the OpenAI error shape."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, status: int | None = None):
        super().__init__(message)
        self.param = param
        if status is not None:
            self.status = status

    def payload(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.status}}  # fmt: skip


class BadRequest(HttpError):
    """HTTP 400."""


class NotFound(HttpError):
    """HTTP 404 (an unknown route or model)."""

    status = 404
    kind = "not_found_error"


def _no_constants(name: str) -> Any:
    raise BadRequest(f"invalid JSON: {name} is not a number JSON allows")


def parse_json(raw: bytes) -> Any:
    """The request body as JSON; BadRequest for anything that is not strict JSON."""
    try:
        return json.loads(raw or b"null", parse_constant=_no_constants)
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"invalid JSON: {err}") from None


def field_value(body: dict, name: str, kind, default, check=None, what: str = ""):
    """`body[name]` (or `default` when absent or null) if it is a `kind` (ints pass as floats;
    floats must be finite) satisfying `check`; else BadRequest naming the field and `what`."""
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 1 << 1000 else math.inf
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"{name}: expected {kind.__name__}, got {short_repr(value)}", name)
    if kind is float and not math.isfinite(value):
        raise BadRequest(f"{name}: expected a finite number, got {value!r}", name)
    if check is not None and not check(value):
        raise BadRequest(f"{name}: expected {what}, got {short_repr(value)}", name)
    return value


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def utf8_text(value: str, name: str) -> str:
    """`value` if it encodes as UTF-8 (JSON admits lone surrogates, tokenizers do not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name}: not valid Unicode text (a lone surrogate?)", name) from None
    return value


def is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _busy_reply(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "service_unavailable",
                                 "param": None, "code": 503}}).encode()  # fmt: skip
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog and a bound on open connections."""

    daemon_threads = True

    def __init__(self, address, handler, limits: ServeLimits) -> None:
        self.request_queue_size = limits.backlog  # read by server_activate's listen()
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            try:
                request.settimeout(1.0)
                request.sendall(_busy_reply("too many open connections; retry later"))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(
    host: str,
    port: int,
    protocol: Any,  # server.OpenAIProtocol (not imported: server imports this module)
    service: LockstepService,
    limits: ServeLimits | None = None,
) -> ThreadingHTTPServer:
    """A threaded HTTP server bound to (host, port) that answers through `service`."""
    limits = limits or ServeLimits()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = limits.read_timeout_s

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("http: " + fmt, *args)

        def _error(self, err: HttpError, close: bool = False) -> None:
            if close:
                self.close_connection = True
            try:
                send_json(self, err.status, err.payload())
            except OSError:
                self.close_connection = True

        def do_GET(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                send_json(self, 200, {"status": "stopping" if service.stop_requested else "ok"})
            elif path == "/v1/models":
                send_json(self, 200, protocol.models())
            elif path == "/stats":
                send_json(self, 200, {"requests": service.jobs, "batches": service.batches,
                                      "sequences": service.sequences,
                                      "refused_connections": self.server.refused})  # fmt: skip
            else:
                self._error(NotFound(f"no route GET {self.path}"))

        def _refuse_method(self) -> None:
            self._error(HttpError(f"method {self.command} not allowed", status=405), close=True)

        do_PUT = do_DELETE = do_PATCH = _refuse_method

        def _body(self) -> bytes | None:
            """The request body, or None after answering an error (the connection closes)."""
            if self.headers.get("Transfer-Encoding"):
                self._error(HttpError("Transfer-Encoding is not supported: send Content-Length",
                                      status=411), close=True)  # fmt: skip
                return None
            length = (self.headers.get("Content-Length") or "0").strip()
            if not length.isdigit():
                self._error(BadRequest(f"Content-Length: expected a non-negative integer, got "
                                       f"{length[:40]!r}"), close=True)  # fmt: skip
                return None
            if int(length) > limits.max_body_bytes:
                self._error(HttpError(f"request body of {int(length)} bytes; the limit is "
                                      f"{limits.max_body_bytes}", status=413), close=True)  # fmt: skip
                return None
            try:
                raw = self.rfile.read(int(length))
            except TimeoutError:
                self._error(HttpError("request body not received in time", status=408), True)
                return None
            if len(raw) < int(length):  # the client closed before sending it all
                self.close_connection = True
                return None
            return raw

        def do_POST(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            raw = self._body()
            if raw is None:
                return
            if path not in ("/v1/completions", "/v1/chat/completions"):
                self._error(NotFound(f"no route POST {self.path}"))
                return
            try:
                req = protocol.parse(parse_json(raw), chat=path.endswith("/chat/completions"))
                if req.stream:
                    send_stream(self, service.stream(req.prompts, req.params, req.seeds),
                                StreamResponse(protocol, req))  # fmt: skip
                    return
                outs = service.submit(req.prompts, req.params, req.seeds)
                send_json(self, 200, protocol.response(req, outs))
            except HttpError as err:
                self._error(err)
            except ValueError as err:  # the engine's own validation
                self._error(BadRequest(str(err)))
            except ServiceStopped as err:
                self._error(HttpError(str(err), status=503))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception as err:  # noqa: BLE001 - a server answers, never dies with a request
                log.exception("request failed")
                failure = HttpError(f"{type(err).__name__}: {err}", status=500)
                failure.kind = "server_error"
                self._error(failure)

    return _Server((host, port), Handler, limits)
