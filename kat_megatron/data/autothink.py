"""The AutoThink answer format: render, a strict parser with error positions, a lenient parser.

`python -c "from kat_megatron.data.autothink import *; print(render_response(AutoThinkResponse(
judge='Simple arithmetic.', mode='think_off', answer='4')))"` prints one canonical answer:

    <judge>
    {judge}
    </judge>

    <think_on>                      (or <think_off>, which has no <think> block)
    <think>
    {reasoning}
    </think>

    <answer>
    {answer}
    </answer>

The released KAT-V1 card shows the sections and tokens; the exact whitespace is our decision:
`render_response` writes it and `parse_strict` accepts exactly what `render_response` writes
(plus one optional trailing `<|im_end|>` or `<|endoftext|>`), so `parse_strict(render(x)) == x`.
Section texts may not contain any of the special tokens. `parse_lenient` reads whatever a model
produced, for scoring: it never raises, and reports the strict parser's error alongside.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

JUDGE_OPEN, JUDGE_CLOSE = "<judge>", "</judge>"
THINK_ON, THINK_OFF = "<think_on>", "<think_off>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
AUTOTHINK_TAGS = (
    JUDGE_OPEN, JUDGE_CLOSE, THINK_ON, THINK_OFF, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE
)  # fmt: skip
"""The eight AutoThink special tokens (same order as `kat_megatron.data.tokenizer`)."""
ALL_TAGS = (*AUTOTHINK_TAGS, IM_START, IM_END, EOS)
MODES = ("think_on", "think_off")
MODE_TOKENS = {"think_on": THINK_ON, "think_off": THINK_OFF}
GENERATION_PREFIX = JUDGE_OPEN + "\n"
"""What the chat template's generation prompt already contains of the answer."""
END_TOKENS = (IM_END, EOS)

_TAG_RE = re.compile("|".join(re.escape(t) for t in sorted(ALL_TAGS, key=len, reverse=True)))


class FormatError(ValueError):
    """A text that is not a canonical AutoThink answer; `pos` is the 0-based character offset."""

    def __init__(self, message: str, text: str, pos: int) -> None:
        self.reason = message
        self.pos = pos
        self.line = text.count("\n", 0, pos) + 1
        self.column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        found = repr(text[pos : pos + 20]) if pos < len(text) else "end of text"
        super().__init__(
            f"{message} at line {self.line}, column {self.column} (offset {pos}); found {found}"
        )


def find_tag(text: str) -> str | None:
    """The first special token (AutoThink or ChatML) in `text`, or None."""
    m = _TAG_RE.search(text)
    return m.group() if m else None


@dataclass(frozen=True)
class AutoThinkResponse:
    """One assistant answer: judge text, mode, reasoning (think_on only) and the visible answer."""

    judge: str
    mode: str
    answer: str
    think: str | None = None
    """The reasoning; required (non-empty) for think_on, must be None for think_off."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {list(MODES)}")
        if self.mode == "think_off" and self.think is not None:
            raise ValueError("think_off answers have no reasoning; pass think=None")
        sections = {"judge": self.judge, "answer": self.answer}
        if self.mode == "think_on":
            sections["think"] = self.think
        for name, value in sections.items():
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: expected non-empty text, got {value!r}")
            tag = find_tag(value)
            if tag is not None:
                raise ValueError(f"{name} contains the special token {tag!r}")


def render_response(resp: AutoThinkResponse) -> str:
    """The canonical text of `resp` (the assistant message content, starting with `<judge>`)."""
    parts = [f"{JUDGE_OPEN}\n{resp.judge}\n{JUDGE_CLOSE}\n\n{MODE_TOKENS[resp.mode]}\n"]
    if resp.mode == "think_on":
        parts.append(f"{THINK_OPEN}\n{resp.think}\n{THINK_CLOSE}\n\n")
    parts.append(f"{ANSWER_OPEN}\n{resp.answer}\n{ANSWER_CLOSE}")
    return "".join(parts)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def expect(self, literal: str) -> None:
        """Consume `literal`; errors point at the first differing character (or its token)."""
        if not self.text.startswith(literal, self.pos):
            got = self.text[self.pos : self.pos + len(literal)]
            k = next((i for i, (a, b) in enumerate(zip(literal, got)) if a != b), len(got))
            tag = literal.rfind("<", 0, k)
            if tag >= 0 and ">" not in literal[tag:k]:  # inside a token: point at its start
                k = tag
            raise FormatError(f"expected {literal!r}", self.text, self.pos + k)
        self.pos += len(literal)

    def section(self, name: str, close: str) -> str:
        """Read a section body up to `\\n{close}`; the body may hold no special token."""
        m = _TAG_RE.search(self.text, self.pos)
        if m is None:
            raise FormatError(
                f"unterminated {name}: expected '\\n{close}'", self.text, len(self.text)
            )
        if m.group() != close:
            raise FormatError(
                f"unexpected {m.group()!r} in {name}; expected '\\n{close}'", self.text, m.start()
            )
        end = m.start()
        body = self.text[self.pos : max(end - 1, self.pos)]
        if not body.strip():
            raise FormatError(f"empty {name}", self.text, self.pos)
        if self.text[end - 1] != "\n":
            raise FormatError(f"expected a newline before {close!r}", self.text, end)
        self.pos = end - 1
        return body


def parse_strict(text: str) -> AutoThinkResponse:
    """Parse a canonical AutoThink answer; raise FormatError naming the first offending position.

    Accepts exactly `render_response`'s output, optionally followed by one `<|im_end|>` or
    `<|endoftext|>`. A completion sampled after the generation prompt lacks the opening
    `<judge>\\n`: parse `GENERATION_PREFIX + completion` (positions then count that prefix).
    """
    s = _Scanner(text)
    s.expect(GENERATION_PREFIX)
    judge = s.section("judge", JUDGE_CLOSE)
    s.expect(f"\n{JUDGE_CLOSE}\n\n")
    mode = next((m for m, tok in MODE_TOKENS.items() if text.startswith(tok + "\n", s.pos)), None)
    if mode is None:
        raise FormatError(f"expected '{THINK_ON}\\n' or '{THINK_OFF}\\n'", text, s.pos)
    s.pos += len(MODE_TOKENS[mode]) + 1
    think = None
    if mode == "think_on":
        s.expect(THINK_OPEN + "\n")
        think = s.section("think", THINK_CLOSE)
        s.expect(f"\n{THINK_CLOSE}\n\n")
    elif text.startswith(THINK_OPEN, s.pos):
        raise FormatError(f"{THINK_OPEN!r} is not allowed after {THINK_OFF!r}", text, s.pos)
    s.expect(ANSWER_OPEN + "\n")
    answer = s.section("answer", ANSWER_CLOSE)
    s.expect(f"\n{ANSWER_CLOSE}")
    for end in END_TOKENS:
        if text.startswith(end, s.pos):
            s.pos += len(end)
            break
    if s.pos != len(text):
        raise FormatError(f"unexpected text after {ANSWER_CLOSE!r}", text, s.pos)
    return AutoThinkResponse(judge=judge, mode=mode, answer=answer, think=think)


@dataclass(frozen=True)
class LenientParse:
    """Best-effort reading of a model output. Missing sections are None; `answer` is never None."""

    mode: str | None
    judge: str | None
    think: str | None
    answer: str
    error: FormatError | None
    """The strict parser's error; None when the text is a canonical answer."""

    @property
    def well_formed(self) -> bool:
        return self.error is None


def _between(text: str, open_tag: str, close_tag: str, start: int = 0) -> tuple[str, int] | None:
    """(text after `open_tag` up to `close_tag` or the end, index after it), or None."""
    i = text.find(open_tag, start)
    if i < 0:
        return None
    i += len(open_tag)
    j = text.find(close_tag, i)
    return (text[i:], len(text)) if j < 0 else (text[i:j], j + len(close_tag))


def _strip_tags(text: str) -> str:
    return _TAG_RE.sub("", text).strip()


def parse_lenient(text: str) -> LenientParse:
    """Read any output: first mode token, judge/think spans (unclosed ones run to the end), and
    the answer (last `<answer>` span, else what follows `</think>`, the mode token or `</judge>`).
    """
    try:
        strict = parse_strict(text)
        return LenientParse(strict.mode, strict.judge, strict.think, strict.answer, None)
    except FormatError as err:
        error = err
    body = text.rstrip()
    while body.endswith(END_TOKENS):
        body = body[: body.rfind("<")].rstrip()
    positions = {m: body.find(tok) for m, tok in MODE_TOKENS.items() if tok in body}
    mode = min(positions, key=positions.get) if positions else None
    judge_close = body.find(JUDGE_CLOSE)
    judge = None
    if judge_close >= 0:
        opened = body.find(JUDGE_OPEN)
        start = opened + len(JUDGE_OPEN) if 0 <= opened < judge_close else 0
        judge = _strip_tags(body[start:judge_close])
    think_span = _between(body, THINK_OPEN, THINK_CLOSE)
    think = _strip_tags(think_span[0]) if think_span else None
    last_open = body.rfind(ANSWER_OPEN)
    if last_open >= 0:
        answer = _between(body, ANSWER_OPEN, ANSWER_CLOSE, last_open)[0]
    elif think_span is not None:
        answer = body[think_span[1] :]
    elif mode is not None:
        answer = body[positions[mode] + len(MODE_TOKENS[mode]) :]
    elif judge_close >= 0:
        answer = body[judge_close + len(JUDGE_CLOSE) :]
    else:
        answer = body
    return LenientParse(mode, judge or None, think, _strip_tags(answer), error)


def answer_only(content: str) -> str:
    """What the chat template keeps of an earlier assistant turn: the stripped text inside the
    first `</answer>` and the last `<answer>` before it; content without `</answer>` is kept."""
    if ANSWER_CLOSE not in content:
        return content
    return content.split(ANSWER_CLOSE)[0].split(ANSWER_OPEN)[-1].strip()


def strip_reasoning(text: str) -> tuple[str | None, str]:
    """Split an R1-style `<think>...</think>rest` (teacher output) into (reasoning, rest), both
    stripped; text without a closed think block comes back unchanged as (None, text)."""
    span = _between(text, THINK_OPEN, THINK_CLOSE)
    if span is None or THINK_CLOSE not in text:
        return None, text
    return span[0].strip(), text[span[1] :].strip()


def forced_mode_prefix(mode: str, judge: str = "I will decide how to answer this query.") -> str:
    """Text to append after the chat template's generation prompt to force `mode`.

    The model then continues inside `<think>` (think_on) or `<answer>` (think_off); prepend
    `GENERATION_PREFIX` to prefix + continuation to get a full answer for the parsers.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    opener = THINK_OPEN if mode == "think_on" else ANSWER_OPEN
    return f"{judge}\n{JUDGE_CLOSE}\n\n{MODE_TOKENS[mode]}\n{opener}\n"
