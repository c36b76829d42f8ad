"""Verifier interface and registry: `get_verifier("math")(response, reference) -> VerifyResult`.

`python -c "from kat_megatron.verifiers import get_verifier; print(get_verifier('math')(
'so \\\\boxed{4}', '4'))"`

A verifier checks the user-visible answer text (callers extract it from an AutoThink output
with `autothink.parse_lenient(...).answer`) against a reference whose type depends on the
verifier. Verifiers are shared by the data pipelines (`kat data tag/synthesize`) and RL rewards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of one check: `correct` is the pass/fail used for pass rates; `score` in [0, 1]
    gives partial credit (fraction of unit tests passed), `detail` says why."""

    correct: bool
    score: float
    detail: str = ""
    error: str | None = None
    """Set when the check itself failed (e.g. the code sandbox could not run): the answer was
    not judged, `correct`/`score` are then False/0 placeholders; do not train on them."""


class Verifier(Protocol):
    name: str

    def __call__(self, response: str, reference: Any) -> VerifyResult: ...


VERIFIERS: dict[str, Callable[..., Verifier]] = {}
"""Verifier factories by name; `register_verifier` adds one."""


def register_verifier(name: str) -> Callable[[Callable[..., Verifier]], Callable[..., Verifier]]:
    """Class/factory decorator: `@register_verifier("math")`."""

    def deco(factory: Callable[..., Verifier]) -> Callable[..., Verifier]:
        if name in VERIFIERS:
            raise ValueError(f"verifier {name!r} is already registered")
        VERIFIERS[name] = factory
        return factory

    return deco
