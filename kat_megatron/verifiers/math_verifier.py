"""`get_verifier("math")`: mathematical equivalence through Hugging Face's `math-verify`.

The reference is a number or a LaTeX/plain expression (`"1/2"`, `"\\frac{1}{2}"`, `"$x^2$"`);
the response is free text whose last boxed/LaTeX/plain answer is extracted by math-verify.
math-verify's own timeouts use `signal.alarm`, which only works in the main thread: there they
are on (`timeout_s`); in worker threads they are off and only the last `max_chars` characters of
the response are parsed to bound the work (a known weakness; the RL sandbox can run it in a
process instead).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from kat_megatron.verifiers.base import VerifyResult, register_verifier


class _NoTimeoutWarning(logging.Filter):
    """Drop math-verify's "Timeout is disabled" warning: we disable it on purpose (threads)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


def _timeout(seconds: int) -> int | None:
    if threading.current_thread() is threading.main_thread():
        return seconds
    for name in ("math_verify.parser", "math_verify.grader"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoTimeoutWarning) for f in log.filters):
            log.addFilter(_NoTimeoutWarning())
    return None


def _gold_text(reference: Any) -> str:
    if isinstance(reference, bool) or not isinstance(reference, (str, int, float)):
        raise ValueError(f"math reference must be a string or number, got {reference!r}")
    text = str(reference).strip()
    if not text:
        raise ValueError("math reference is empty")
    return text if ("$" in text or "\\boxed" in text) else f"${text}$"


@register_verifier("math")
@dataclass
class MathVerifier:
    """Correct when math-verify finds the response's answer equivalent to the reference."""

    name: ClassVar[str] = "math"
    timeout_s: int = 5
    """Per parse/compare in the main thread (seconds, whole)."""
    max_chars: int = 4000
    """Only the tail of the response is parsed."""

    def validate_reference(self, reference: Any) -> None:
        """Raise ValueError when the reference is not a parseable answer."""
        from math_verify import parse

        if not parse(_gold_text(reference), parsing_timeout=_timeout(self.timeout_s)):
            raise ValueError(f"math reference {reference!r} does not parse")

    def __call__(self, response: str, reference: Any) -> VerifyResult:
        from math_verify import parse, verify

        timeout = _timeout(self.timeout_s)
        try:
            gold = parse(_gold_text(reference), parsing_timeout=timeout)
            pred = parse(response[-self.max_chars :], parsing_timeout=timeout)
            if not pred:
                return VerifyResult(False, 0.0, "no answer found in the response")
            ok = bool(verify(gold, pred, timeout_seconds=timeout))
        except ValueError:
            raise
        except Exception as err:  # math-verify timeouts and sympy failures
            return VerifyResult(False, 0.0, f"math-verify failed: {err!r}")
        return VerifyResult(ok, float(ok), f"parsed {pred[-1]!s}")
