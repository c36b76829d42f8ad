"""OpenAI-compatible HTTP server on the rollout engine: `kat serve --ckpt DIR [--nproc N] [--port P]`.

Endpoints (JSON; loopback by default, no authentication):
- `POST /v1/completions`: `prompt` (a string, a list of strings, token ids or lists of them),
  `max_tokens` (16), `temperature` (1), `top_p` (1), `top_k` (0 = off; vLLM extension),
  `n` (1), `stop` (string or list), `stop_token_ids` (vLLM extension), `seed`, `logprobs`
  (any non-null value returns `tokens`, `token_logprobs` and `text_offset`; `top_logprobs` is
  null: alternatives are not computed), `ignore_eos`, `return_token_ids` (adds
  `choices[i].token_ids`, as vLLM), `stream` (below). `echo` is refused.
- `POST /v1/chat/completions`: `messages` rendered with the AutoThink chat template and its
  generation prompt; the reply `content` is the model's continuation after
  `<|im_start|>assistant\\n<judge>\\n`. With `continue_final_message: true` (vLLM's name) a final
  assistant message is a prefill that the model continues (its text may start with `<judge>`).
  `logprobs: true` returns `choices[i].logprobs.content[j] = {token, logprob, bytes,
  top_logprobs: []}`. `max_tokens`/`max_completion_tokens` default to the context left.
- `GET /v1/models`, `GET /health`.

`stream: true` (either POST endpoint) answers `Content-Type: text/event-stream`, one
`data: {chunk}\\n\\n` event per chunk and a final `data: [DONE]\\n\\n` (chunked transfer
encoding). Chunks share the response's `id`, `created` and `model`; each holds one choice, and
with `n > 1` (or several prompts) the choices' chunks interleave in index order, step by step.
Completions: `object: text_completion`, `choices: [{index, text, logprobs, finish_reason}]`;
chat: `object: chat.completion.chunk`, a first `delta: {role: assistant, content: ""}` per
choice, then `delta.content` pieces (with `--reasoning-parser autothink`,
`delta.reasoning_content` pieces, and `content` plus `autothink` in the choice's last delta).
A choice's last chunk carries its `finish_reason`. `logprobs` / `return_token_ids` give each
chunk its new tokens' entries.
`stream_options: {include_usage: true}` adds `usage: null` to every chunk and one last chunk
`{choices: [], usage}` equal to the non-streamed `usage`. Streaming is incremental: the engine's
per-step callback (`on_step`) hands rank 0's HTTP thread every sampled token during the batch.
The concatenated deltas equal the non-streamed `text` / `content` / `reasoning_content` for the
same request and seed; text that the next tokens could still change (an incomplete UTF-8
character, a possible start of a `stop` string, a partial tag) is held back, and the autothink
`content` comes with the choice's last chunk (`streaming` says why). Errors found before
generation (bad fields, the engine's checks) are HTTP 400 JSON before any event; a client that
leaves mid-stream costs one log line (its generation runs to the end, unread).

Generation stops at `<|im_end|>` and `<|endoftext|>` (unless `ignore_eos`), at `stop_token_ids`
and at `stop` strings; the returned text excludes the stop token and is cut before a stop string
(OpenAI semantics). Request `seed` s gives sample j the generator seed `request_seed(s, j)`, so a
request's answer does not depend on what it is batched with; without a seed one is drawn.
A request's `model` must be one of the served names (`--model-name`, default the checkpoint
folder's name) or absent; others get 404. Limits on requests and connections, and what each kind
of malformed request gets: `http_server`.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kat_megatron.data.autothink import (
    GENERATION_PREFIX,
    MODES,
    forced_mode_prefix,
    parse_lenient,
)
from kat_megatron.data.chat_template import render_chat, validate_messages
from kat_megatron.inference.http_server import (
    BadRequest,
    NotFound,
    ServeLimits,
    make_server,
)
from kat_megatron.inference.http_server import (
    field_value as _field,
)
from kat_megatron.inference.http_server import (
    is_token_id as _is_id,
)
from kat_megatron.inference.http_server import (
    short_repr as _short,
)
from kat_megatron.inference.http_server import (
    utf8_text as _text,
)
from kat_megatron.inference.sampling import cut_at_stop, request_seed
from kat_megatron.inference.service import LockstepService
from kat_megatron.inference.types import Completion, SamplingParams

log = logging.getLogger("kat")
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
REASONING_PARSERS = ("none", "autothink")


@dataclass
class Request:
    """A parsed request: prompts (one per sample), sampling, and how to answer."""

    prompts: list[list[int]]
    n: int
    params: SamplingParams
    seeds: list[int]
    logprobs: bool
    chat: bool
    token_ids: bool = False
    prefill: str = ""
    """Answer text already in the prompt (a forced mode's prefix) for the reasoning parser."""
    stream: bool = False
    include_usage: bool = False
    """`stream_options.include_usage`: a last chunk with `usage` (and `usage: null` before)."""


class OpenAIProtocol:
    """Translates OpenAI request bodies to engine calls and completions back to responses."""

    def __init__(
        self,
        tokenizer,
        max_sequence_length: int,
        model_name: str,
        reasoning_parser: str = "none",
        limits: ServeLimits | None = None,
    ) -> None:
        if reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"reasoning_parser: expected one of {REASONING_PARSERS}, got {reasoning_parser!r}"
            )
        self.reasoning_parser = reasoning_parser
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.names = [n.strip() for n in model_name.split(",") if n.strip()] or [model_name]
        """Served names (`--model-name a,b`): the first is reported, any is accepted."""
        self.model_name = self.names[0]
        self.limits = limits or ServeLimits()
        self.max_tokens = min(self.limits.max_tokens or max_sequence_length, max_sequence_length)
        self.end_ids = [i for t in END_TOKENS if (i := tokenizer.convert_tokens_to_ids(t)) is not None
                        and i != tokenizer.unk_token_id]  # fmt: skip

    def encode(self, text: str) -> list[int]:
        from kat_megatron.data.tokenizer import encode_text

        return encode_text(self.tokenizer, text)

    @staticmethod
    def _think_mode(body: dict) -> str | None:
        """`chat_template_kwargs.think_mode`: think_on / think_off force a mode; auto: none."""
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise BadRequest("chat_template_kwargs: expected an object")
        mode = kwargs.get("think_mode", "auto")
        if mode not in ("auto", *MODES):
            raise BadRequest(f"chat_template_kwargs.think_mode: expected auto, think_on or "
                             f"think_off, got {mode!r}")  # fmt: skip
        return None if mode == "auto" else mode

    def _prompts(self, body: dict, chat: bool) -> list[list[int]]:
        if chat:
            messages = body.get("messages")
            try:
                validate_messages(messages)
            except ValueError as err:
                raise BadRequest(str(err), "messages") from None
            for i, m in enumerate(messages):
                _text(m["content"], f"messages[{i}].content")
            if body.get("continue_final_message") and messages[-1]["role"] == "assistant":
                prefill = messages[-1]["content"]
                head = render_chat(messages[:-1], add_generation_prompt=True)
                if prefill.startswith(GENERATION_PREFIX.strip()):
                    head = head[: -len(GENERATION_PREFIX)]
                return [self.encode(head + prefill)]
            mode = self._think_mode(body)
            prefix = forced_mode_prefix(mode) if mode else ""
            return [self.encode(render_chat(messages, add_generation_prompt=True) + prefix)]
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [self.encode(_text(prompt, "prompt"))]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt: expected a string, a list of strings, or token ids", "prompt")
        if len(prompt) > self.limits.max_prompts and not all(_is_id(p) for p in prompt):
            raise BadRequest(f"prompt: {len(prompt)} prompts; the limit is "
                             f"{self.limits.max_prompts} per request", "prompt")  # fmt: skip
        if all(_is_id(p) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [self.encode(_text(p, f"prompt[{i}]")) for i, p in enumerate(prompt)]
        if all(isinstance(p, list) for p in prompt):
            for i, p in enumerate(prompt):
                if not p or not all(_is_id(t) for t in p):
                    raise BadRequest(f"prompt[{i}]: expected a non-empty list of integer token "
                                     f"ids", "prompt")  # fmt: skip
            return [list(p) for p in prompt]
        bad = next(i for i, p in enumerate(prompt) if not isinstance(p, (str, list)))
        raise BadRequest(f"prompt[{bad}]: expected every element to be a string or a list of "
                         f"token ids, got {_short(prompt[bad])}", "prompt")  # fmt: skip

    def check_model(self, body: dict) -> None:
        """NotFound unless `model` is absent or one of the served names (as vLLM)."""
        model = body.get("model")
        if model is not None and model not in self.names:
            raise NotFound(f"The model `{_short(model)}` does not exist (served: "
                           f"{', '.join(self.names)})", "model")  # fmt: skip

    def parse(self, body: Any, chat: bool) -> Request:
        """Validate `body`; raise BadRequest naming the field on bad input (NotFound for an
        unknown model)."""
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object")
        self.check_model(body)
        if body.get("echo"):
            raise BadRequest("echo: not supported by kat serve")
        stream = _field(body, "stream", bool, False)
        options = _field(body, "stream_options", dict, {}) if stream else {}
        include_usage = _field(options, "include_usage", bool, False)
        prompts = self._prompts(body, chat)
        for p in prompts:
            if not p or len(p) >= self.max_sequence_length:
                raise BadRequest(
                    f"prompt: {len(p)} tokens; expected 1..{self.max_sequence_length - 1}"
                )
        cap = self.max_tokens
        within = (lambda v: 1 <= v <= cap), f"1..{cap} (the server's limit)"
        max_tokens = _field(body, "max_completion_tokens", int, None, *within)
        max_tokens = max_tokens or _field(body, "max_tokens", int, cap if chat else 16, *within)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop: expected a string or a list of strings", "stop")
        if len(stop) > self.limits.max_stop or any(len(s) > 256 for s in stop):
            raise BadRequest(f"stop: at most {self.limits.max_stop} strings of at most 256 "
                             f"characters", "stop")  # fmt: skip
        stop = [_text(s, "stop") for s in stop]
        stop_ids = _field(body, "stop_token_ids", list, [])
        if not all(_is_id(i) for i in stop_ids) or len(stop_ids) > 256:
            raise BadRequest("stop_token_ids: expected at most 256 integers", "stop_token_ids")
        if not _field(body, "ignore_eos", bool, False):
            stop_ids = [*stop_ids, *self.end_ids]
        top_k = _field(body, "top_k", int, 0, lambda v: v >= -1, ">= -1")
        try:
            params = SamplingParams(
                temperature=_field(body, "temperature", float, 1.0),
                top_p=_field(body, "top_p", float, 1.0),
                top_k=max(top_k, 0),
                max_new_tokens=max_tokens,
                stop_strings=stop,
                stop_token_ids=stop_ids,
            )
        except ValueError as err:
            raise BadRequest(str(err), str(err).split(":")[0]) from None
        n = _field(body, "n", int, 1, lambda v: 1 <= v <= self.limits.max_n,
                   f"1..{self.limits.max_n} (the server's limit)")  # fmt: skip
        if n * len(prompts) > self.limits.max_samples:
            raise BadRequest(f"n x prompts = {n * len(prompts)} sequences; the limit is "
                             f"{self.limits.max_samples} per request", "n")  # fmt: skip
        seed = _field(body, "seed", int, None, lambda v: abs(v) < 1 << 63, "|seed| < 2**63")
        seed = random.getrandbits(63) if seed is None else seed
        seeds = [request_seed(seed, j) for j in range(n)] * len(prompts)
        chat_lp = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
        mode = self._think_mode(body) if chat and not body.get("continue_final_message") else None
        return Request(
            [p for p in prompts for _ in range(n)], n, params, seeds, chat_lp, chat,
            token_ids=bool(body.get("return_token_ids")),
            prefill=forced_mode_prefix(mode) if mode else "",
            stream=stream, include_usage=include_usage,
        )  # fmt: skip

    def visible(self, c: Completion, params: SamplingParams) -> tuple[list[int], str]:
        """Token ids and text the client sees: no final stop token, cut before stop strings."""
        ids = c.token_ids
        if c.finish_reason == "stop" and ids and ids[-1] in params.stop_token_ids:
            ids = ids[:-1]
        text = cut_at_stop(self.tokenizer.decode(ids), params.stop_strings)
        return ids, text

    def logprobs(
        self, ids: list[int], logprobs: list[float], chat: bool, at: int = 0
    ) -> tuple[dict, int]:
        """The `logprobs` object of tokens `ids` (their text offsets counted from `at`), and the
        offset after them (a stream's chunks continue from it)."""
        pieces = [self.tokenizer.decode([i]) for i in ids]
        if chat:
            content = [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                        "top_logprobs": []} for t, lp in zip(pieces, logprobs)]  # fmt: skip
            return {"content": content}, at
        offsets = []
        for t in pieces:
            offsets.append(at)
            at += len(t)
        return {"tokens": pieces, "token_logprobs": logprobs[: len(ids)],
                "top_logprobs": None, "text_offset": offsets}, at  # fmt: skip

    def message(self, text: str) -> dict[str, Any]:
        """The assistant message; with the autothink reasoning parser (as vLLM's
        `--reasoning-parser`), `content` is the answer, `reasoning_content` the think text, and
        `autothink` holds the judge, the mode and whether the strict parser accepted it."""
        if self.reasoning_parser == "none":
            return {"role": "assistant", "content": text}
        parsed = parse_lenient(GENERATION_PREFIX + text)
        return {
            "role": "assistant",
            "content": parsed.answer,
            "reasoning_content": parsed.think,
            "autothink": {"judge": parsed.judge, "mode": parsed.mode,
                          "well_formed": parsed.well_formed},
        }  # fmt: skip

    def response(self, req: Request, outs: list[Completion]) -> dict:
        """The OpenAI response object for `req`'s completions."""
        choices = []
        for i, c in enumerate(outs):
            ids, text = self.visible(c, req.params)
            choice: dict[str, Any] = {"index": i, "finish_reason": c.finish_reason}
            if req.chat:
                choice["message"] = self.message(req.prefill + text)
            else:
                choice["text"] = text
            lp = self.logprobs(ids, c.logprobs, req.chat)[0] if req.logprobs else None
            choice["logprobs"] = lp
            if req.token_ids:
                choice["token_ids"] = ids
            choices.append(choice)
        return {
            "id": self.response_id(req.chat),
            "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": self.usage(req, outs),
        }

    @staticmethod
    def response_id(chat: bool) -> str:
        return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    @staticmethod
    def usage(req: Request, outs: list[Completion]) -> dict[str, int]:
        """Prompt tokens (once per prompt, not per sample) and generated tokens (stop tokens
        included), as the non-streamed response and a stream's usage chunk report them."""
        prompt_tokens = sum(len(p) for p in req.prompts[:: req.n])
        completion_tokens = sum(len(c.token_ids) for c in outs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                "owned_by": "kat", "max_model_len": self.max_sequence_length}]}  # fmt: skip


@dataclass
class ServeConfig:
    """`kat serve` options."""

    ckpt: str
    """A kat checkpoint (`iter_N/`) or a directory of them (the newest is served)."""
    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (see the ready file or the printed URL)."""
    max_batch_size: int = 64
    max_sequence_length: int | None = None
    """Prompt + completion tokens; None: the model's max_position_embeddings."""
    model_name: str | None = None
    """Name reported by /v1/models and in responses, and the only `model` requests may name
    (others get 404, as vLLM); `a,b` serves aliases. None: the checkpoint directory's name."""
    tokenizer: str | None = None
    """Tokenizer directory (or `tiny`); None: the run's data.tokenizer."""
    reasoning_parser: str = "none"
    """autothink: chat replies carry the answer as `content` and the think text as
    `reasoning_content` (what data pipelines expect of a reasoning model); none: the raw text."""
    ready_file: str | None = None
    """Written (the base URL, `http://HOST:PORT/v1`) once the server accepts requests."""
    limits: ServeLimits = field(default_factory=ServeLimits)
    """Request and connection limits (`http_server.ServeLimits`)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected >= 1, got {self.max_batch_size}")
        if self.max_sequence_length is not None and self.max_sequence_length < 2:
            raise ValueError(f"max_sequence_length: expected >= 2, got {self.max_sequence_length}")


def serve(cfg: ServeConfig, on_ready=None) -> int:
    """Every rank: load the engine at TP = WORLD_SIZE, serve until SIGTERM/SIGINT, return 0.

    Rank 0 answers HTTP and calls `on_ready(url)` once listening; the others follow in lockstep.
    """
    import os
    import signal
    import threading
    from pathlib import Path

    from kat_megatron.inference.loading import engine_from_checkpoint
    from kat_megatron.parallel.init import shutdown
    from kat_megatron.utils.io import atomic_write_text

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    engine, tok, _ = engine_from_checkpoint(
        cfg.ckpt, tp=tp, max_batch_size=cfg.max_batch_size,
        max_sequence_length=cfg.max_sequence_length, tokenizer=cfg.tokenizer,
    )  # fmt: skip
    service = LockstepService(engine)
    leader = service.leader
    for sig in (signal.SIGTERM, signal.SIGINT):  # others wait for rank 0's "stop"
        signal.signal(sig, service.request_stop if leader else lambda *_: None)
    server = None
    try:
        if leader:
            name = cfg.model_name or Path(cfg.ckpt).resolve().name
            protocol = OpenAIProtocol(tok, engine.max_sequence_length, name, cfg.reasoning_parser,
                                      cfg.limits)  # fmt: skip
            server = make_server(cfg.host, cfg.port, protocol, service, cfg.limits)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                             daemon=True).start()  # fmt: skip
            url = f"http://{cfg.host}:{server.server_address[1]}/v1"
            if cfg.host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("kat serve: listening on %s without authentication", cfg.host)
            if cfg.ready_file:
                atomic_write_text(cfg.ready_file, url + "\n")
            if on_ready is not None:
                on_ready(url)
        service.run()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
            if cfg.ready_file:
                Path(cfg.ready_file).unlink(missing_ok=True)
        log.info("kat serve: stopped after %d batches", service.batches)
        shutdown()
    return 0
