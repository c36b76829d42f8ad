"""`get_verifier("exact_match")` and `get_verifier("multiple_choice")`.

exact_match: reference is a string or a list of accepted strings; both sides are normalised
(case-folded unless `case_sensitive`, whitespace collapsed, surrounding quotes and trailing
`.!` dropped) and a `\\boxed{...}` in the response is used when present.
multiple_choice: reference is a letter (or a list of accepted letters); the response's choice is
taken from `\\boxed{X}`, the last "answer is (X)"/"Answer: X", a bare "X"/"(X)", or the last "(X)".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from kat_megatron.verifiers.base import VerifyResult, register_verifier

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (one nesting level), or None."""
    found = _BOXED.findall(text)
    return found[-1] if found else None


def _references(reference: Any, what: str) -> list[str]:
    refs = reference if isinstance(reference, list) else [reference]
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise ValueError(f"{what} reference must be a non-empty string or list of strings")
    return refs


def normalize(text: str, case_sensitive: bool = False) -> str:
    text = " ".join(text.split())
    text = text.strip().strip("\"'`").rstrip(".!").strip()
    return text if case_sensitive else text.casefold()


@register_verifier("exact_match")
@dataclass
class ExactMatchVerifier:
    """Correct when the normalised response equals a normalised reference."""

    name: ClassVar[str] = "exact_match"
    case_sensitive: bool = False
    use_boxed: bool = True

    def validate_reference(self, reference: Any) -> None:
        _references(reference, "exact_match")

    def __call__(self, response: str, reference: Any) -> VerifyResult:
        refs = _references(reference, "exact_match")
        boxed = last_boxed(response) if self.use_boxed else None
        got = normalize(boxed if boxed is not None else response, self.case_sensitive)
        ok = any(got == normalize(r, self.case_sensitive) for r in refs)
        return VerifyResult(ok, float(ok), f"got {got[:80]!r}")


_ANSWER_IS = re.compile(r"(?i:answer)\s*(?i:is)?\s*[:\-]?\s*\(?\**([A-Z])\b")
_BARE = re.compile(r"^\(?([A-Za-z])\)?[.:]?$")
_PAREN = re.compile(r"\(([A-Z])\)")


def extract_choice(text: str) -> str | None:
    """The chosen letter in `text`, or None (see the module docstring for the order)."""
    boxed = last_boxed(text)
    if boxed is not None:
        m = re.fullmatch(r"\s*(?:\\text\{)?\(?([A-Za-z])\)?\}?\s*", boxed)
        if m:
            return m.group(1).upper()
    found = _ANSWER_IS.findall(text)
    if found:
        return found[-1].upper()
    m = _BARE.match(text.strip())
    if m:
        return m.group(1).upper()
    found = _PAREN.findall(text)
    return found[-1] if found else None


@register_verifier("multiple_choice")
@dataclass
class MultipleChoiceVerifier:
    """Correct when the extracted letter is one of the reference letters."""

    name: ClassVar[str] = "multiple_choice"

    def validate_reference(self, reference: Any) -> None:
        for r in _references(reference, "multiple_choice"):
            if not re.fullmatch(r"[A-Za-z]", r.strip()):
                raise ValueError(f"multiple_choice reference {r!r} is not a single letter")

    def __call__(self, response: str, reference: Any) -> VerifyResult:
        self.validate_reference(reference)
        refs = {r.strip().upper() for r in _references(reference, "multiple_choice")}
        choice = extract_choice(response)
        if choice is None:
            return VerifyResult(False, 0.0, "no choice found")
        ok = choice in refs
        return VerifyResult(ok, float(ok), f"chose {choice}")
