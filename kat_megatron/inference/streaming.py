"""Server-sent chunks for `kat serve --ckpt DIR` requests with `"stream": true` (`POST
/v1/completions` or `/v1/chat/completions`; tests: `pytest tests/inference/test_server_stream.py`).

Every delta is text that no later token can change, so the concatenated stream equals the
non-streamed answer of the same request and seed exactly; what is still uncertain is held back
and released as soon as it is settled, at the latest with the choice's last chunk, which is
computed by the non-streamed code itself (`OpenAIProtocol.visible` / `.message`) and carries
the rest of the final text. Three layers, each releasing a prefix of the layer's final value:
- `TokenText`: detokenization over a sliding window (as vLLM / HF `TextStreamer`); text that
  ends in U+FFFD (an incomplete UTF-8 character: a byte-level token can hold part of one) waits.
- `stop_safe`: the text is cut at the earliest place a `stop` string may still begin (a suffix
  that is a prefix of one), so no part of a stop string is ever sent.
- `settled_think`: with `--reasoning-parser autothink`, the prefix of `reasoning_content` that
  `parse_lenient` (the non-streamed parser) gives for every continuation of the text so far:
  the common prefix of the strict parser's think body and the lenient reading (tags removed,
  whitespace stripped), with a partially emitted tag and trailing whitespace held back; when the
  text can no longer become a strict answer only the lenient reading counts. `content` is sent
  with the choice's last chunk, not before: `parse_lenient` takes the *last* `<answer>` block,
  so any answer text can still be replaced by a later block until generation ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from kat_megatron.data.autothink import (
    _TAG_RE,
    ALL_TAGS,
    ANSWER_CLOSE,
    ANSWER_OPEN,
    END_TOKENS,
    GENERATION_PREFIX,
    JUDGE_CLOSE,
    THINK_CLOSE,
    THINK_OFF,
    THINK_ON,
    THINK_OPEN,
)
from kat_megatron.inference.types import Completion

if TYPE_CHECKING:
    from kat_megatron.inference.engine import StepEvent
    from kat_megatron.inference.service import Stream

log = logging.getLogger("kat")


class TokenText:
    """The decoded text of a growing token sequence, as far as later tokens cannot change it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # decode window start; end of the released tokens

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        head = self.tokenizer.decode(self.ids[self._prefix : self._read])
        full = self.tokenizer.decode(self.ids[self._prefix :])
        if len(full) > len(head) and not full.endswith("\ufffd") and full.startswith(head):
            self.text += full[len(head) :]
            self._prefix, self._read = self._read, len(self.ids)


def stop_safe(text: str, stops: list[str]) -> str:
    """The prefix of `text` that stays in the answer whatever follows: before the earliest
    complete stop string and before the earliest suffix that is a prefix of a stop string."""
    stops = [s for s in stops if s]
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    longest = max((len(s) for s in stops), default=0)
    for j in range(max(0, len(text) - longest + 1), cut):
        if any(s.startswith(text[j:]) for s in stops):
            return text[:j]
    return text[:cut]


# ------------------------------------------------------------------ autothink reasoning split
def _partial_tag(text: str) -> int:
    """Where a suffix of `text` that is a proper prefix of a special token begins (else len)."""
    i = text.rfind("<")
    if i >= 0 and any(t.startswith(text[i:]) and t != text[i:] for t in ALL_TAGS):
        return i
    return len(text)


def _lenient_think(text: str) -> str:
    """A prefix of `parse_lenient(x).think or ""` for every x that starts with `text`."""
    p = text.find(THINK_OPEN)
    if p < 0:
        return ""
    start = p + len(THINK_OPEN)
    q = text.find(THINK_CLOSE, start)
    raw = text[start:q] if q >= 0 else text[start : start + _partial_tag(text[start:])]
    return _TAG_RE.sub("", raw).strip()


def _strict_think(text: str) -> str | None:
    """None when no x starting with `text` passes `parse_strict`; else a prefix of the think of
    every such x (think_off, or a mode not known yet, counts as "")."""
    pos = 0

    def literal(lit: str) -> bool | None:  # True: consumed; None: the text ends inside; False
        nonlocal pos
        if text.startswith(lit, pos):
            pos += len(lit)
            return True
        return None if lit.startswith(text[pos:]) else False

    def section(close: str) -> bool | None:  # parse_strict's `_Scanner.section`
        nonlocal pos
        m = _TAG_RE.search(text, pos)
        if m is None:
            return None
        end = m.start()
        if m.group() != close or not text[pos : max(end - 1, pos)].strip() or text[end - 1] != "\n":
            return False
        pos = end - 1
        return True

    ok = literal(GENERATION_PREFIX) and section(JUDGE_CLOSE) and literal(f"\n{JUDGE_CLOSE}\n\n")
    if not ok:
        return None if ok is False else ""
    on, off = f"{THINK_ON}\n{THINK_OPEN}\n", f"{THINK_OFF}\n"
    think = ""
    if text.startswith(on, pos):
        pos += len(on)
        start = pos
        ok = section(THINK_CLOSE)
        if ok is None:  # inside the body: hold back a "\n" that may begin "\n</think>"
            body = text[start:]
            j = body.rfind("\n")
            return body[:j] if j >= 0 and f"\n{THINK_CLOSE}".startswith(body[j:]) else body
        think = text[start:pos]
        ok = ok and literal(f"\n{THINK_CLOSE}\n\n")
    elif text.startswith(off, pos):
        pos += len(off)
    else:
        return "" if on.startswith(text[pos:]) or off.startswith(text[pos:]) else None
    ok = ok and literal(ANSWER_OPEN + "\n") and section(ANSWER_CLOSE)
    ok = ok and literal(f"\n{ANSWER_CLOSE}")
    if ok is False or (ok and not any(e.startswith(text[pos:]) for e in END_TOKENS)):
        return None
    return think


def settled_think(text: str) -> str:
    """The prefix of `parse_lenient(x).think or ""` common to every x that starts with `text`
    (as far as this analysis sees; see the module docstring)."""
    lenient, strict = _lenient_think(text), _strict_think(text)
    if strict is None:
        return lenient
    n = 0
    while n < min(len(lenient), len(strict)) and lenient[n] == strict[n]:
        n += 1
    return lenient[:n]


# ---------------------------------------------------------------------------- the chunks
class _Choice:
    """What one choice has received and what of it has been sent."""

    def __init__(self, tokenizer) -> None:
        self.text = TokenText(tokenizer)
        self.logprobs: list[float] = []
        self.sent = ""
        """`text` (completions) or `content` (chat) sent so far."""
        self.reasoning = ""
        """`reasoning_content` sent so far (autothink parser)."""
        self.tokens_sent = 0
        """Tokens whose log-probs / ids have been sent."""
        self.offset = 0
        """`text_offset` of the next token (completions log-probs)."""
        self.finish_reason: str | None = None


class StreamResponse:
    """The chunks of one streamed response: `start()`, then `step(events)` for each decode
    step's `StepEvent`s (indices into `req.prompts`, i.e. choice indices), then `end(outs)`
    with the finished completions; each returns a list of chunk objects (JSON-ready dicts)."""

    def __init__(self, protocol: Any, req: Any) -> None:
        # server.OpenAIProtocol and server.Request (not imported: server imports this module)
        self.protocol, self.req = protocol, req
        self.id = protocol.response_id(req.chat)
        self.created = int(time.time())
        self.choices = [_Choice(protocol.tokenizer) for _ in req.prompts]
        self.parser = req.chat and protocol.reasoning_parser == "autothink"

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict[str, Any]:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.req.chat else "text_completion",
            "created": self.created,
            "model": self.protocol.model_name,
            "choices": choices,
        }
        if self.req.include_usage:
            chunk["usage"] = usage
        return chunk

    def _choice(self, i: int, delta: dict, ids: list[int], finish: str | None) -> dict:
        """One choice's entry; `ids`: the tokens not reported yet (log-probs, token ids)."""
        ch, req = self.choices[i], self.req
        out: dict[str, Any] = {"index": i}
        if req.chat:
            out["delta"] = delta
        else:
            out["text"] = delta.get("text", "")
        out["logprobs"] = None
        if req.logprobs:
            lps = ch.logprobs[ch.tokens_sent : ch.tokens_sent + len(ids)]
            out["logprobs"], ch.offset = self.protocol.logprobs(ids, lps, req.chat, ch.offset)
        out["finish_reason"] = finish
        if req.token_ids:
            out["token_ids"] = ids
        ch.tokens_sent += len(ids)
        return self._chunk([out])

    def start(self) -> list[dict]:
        """Chat: the first chunk of every choice (`role`, and a forced mode's prefix as content
        without the reasoning parser). Completions: nothing."""
        if not self.req.chat:
            return []
        content = "" if self.parser else self.req.prefill
        for ch in self.choices:
            ch.sent = content
        return [
            self._chunk([{"index": i, "delta": {"role": "assistant", "content": content},
                          "logprobs": None, "finish_reason": None}])
            for i in range(len(self.choices))
        ]  # fmt: skip

    def step(self, events: list[StepEvent]) -> list[dict]:
        """Chunks for one decode step's tokens, in choice order."""
        by_choice: dict[int, list[StepEvent]] = {}
        for event in events:
            by_choice.setdefault(event[0], []).append(event)
        out = []
        for i in sorted(by_choice):
            ch = self.choices[i]
            if ch.finish_reason is not None:
                continue
            for _, token, logprob, finish in by_choice[i]:
                ch.text.push(token)
                ch.logprobs.append(logprob)
                ch.finish_reason = finish
            if ch.finish_reason is not None:
                ids, lps = list(ch.text.ids), list(ch.logprobs)
                text = self.protocol.tokenizer.decode(ids)
                out.append(self._final(i, Completion(self.req.prompts[i], ids, lps, text,
                                                     ch.finish_reason)))  # fmt: skip
            else:
                out.extend(self._progress(i))
        return out

    def _progress(self, i: int) -> list[dict]:
        ch, req = self.choices[i], self.req
        visible = stop_safe(ch.text.text, req.params.stop_strings)
        delta = {}
        if self.parser:
            think = settled_think(GENERATION_PREFIX + req.prefill + visible)
            if len(think) > len(ch.reasoning):
                delta["reasoning_content"] = think[len(ch.reasoning) :]
                ch.reasoning = think
        else:
            text = (req.prefill if req.chat else "") + visible
            if len(text) > len(ch.sent):
                delta["content" if req.chat else "text"] = text[len(ch.sent) :]
                ch.sent = text
        new = ch.text.ids[ch.tokens_sent :] if req.logprobs or req.token_ids else []
        return [self._choice(i, delta, new, None)] if delta or new else []

    def _final(self, i: int, c: Completion) -> dict:
        """The choice's last chunk: the rest of exactly what the non-streamed answer holds."""
        ch, req = self.choices[i], self.req
        ch.finish_reason, ch.logprobs = c.finish_reason, list(c.logprobs)
        ids, text = self.protocol.visible(c, req.params)
        extra = {}
        if not req.chat:
            final = {"text": (text, ch.sent)}
        elif self.parser:
            msg = self.protocol.message(req.prefill + text)
            final = {"reasoning_content": (msg["reasoning_content"] or "", ch.reasoning),
                     "content": (msg["content"], ch.sent)}  # fmt: skip
            extra["autothink"] = msg["autothink"]
        else:
            final = {"content": (self.protocol.message(req.prefill + text)["content"], ch.sent)}
        delta = {}
        for name, (value, sent) in final.items():
            if not value.startswith(sent):  # would be a bug in the hold-back rules above
                log.warning("kat serve: streamed %s of choice %d is not a prefix of the answer "
                            "(%r vs %r)", name, i, sent, value)  # fmt: skip
            if value[len(sent) :]:
                delta[name] = value[len(sent) :]
        return self._choice(i, {**delta, **extra}, ids[ch.tokens_sent :], c.finish_reason)

    def end(self, outs: list[Completion]) -> list[dict]:
        """Last chunks of choices the steps did not finish (none, normally) and, with
        `stream_options.include_usage`, the usage chunk (`choices: []`)."""
        out = []
        for i, c in enumerate(outs):
            ch = self.choices[i]
            if ch.finish_reason is None:
                out.append(self._final(i, c))
            elif ch.text.ids != c.token_ids:
                log.warning("kat serve: streamed tokens of choice %d differ from its completion", i)
        if self.req.include_usage:
            out.append(self._chunk([], usage=self.protocol.usage(self.req, outs)))
        return out


def send_stream(handler: BaseHTTPRequestHandler, stream: Stream, chunks: StreamResponse) -> None:
    """Answer `handler`'s request with server-sent events as `stream`'s tokens come. The engine's
    own validation error (or a stop) arrives before the first step and is raised from here,
    before any byte is written (the caller answers 400 / 503); after the headers a failure ends
    the stream, and a client that went away is logged once."""
    steps = iter(stream)
    first = next(steps, None)
    chunked = handler.request_version != "HTTP/1.0"
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Connection", "close")))
    handler.end_headers()
    handler.close_connection = not chunked

    def send(events: list[dict] | None) -> None:  # None: the final [DONE]
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events or [])
        data = b"data: [DONE]\n\n" if events is None else data
        if data:
            handler.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if chunked else data)

    try:
        send(chunks.start())
        if first is not None:
            send(chunks.step(first))
            for events in steps:
                send(chunks.step(events))
        send(chunks.end(stream.completions))
        send(None)
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as err:
        log.info("kat serve: a client left its stream (%s); the generation finishes unread",
                 type(err).__name__)  # fmt: skip
        handler.close_connection = True
    except Exception as err:  # noqa: BLE001 - the headers are out: end the stream instead
        log.exception("kat serve: stream failed")
        handler.close_connection = True
        with contextlib.suppress(OSError):
            send([{"error": {"message": f"{type(err).__name__}: {err}", "type": "server_error",
                             "code": 500}}])  # fmt: skip
