"""Answer verifiers shared by the data pipelines and RL rewards, selected by name.

`get_verifier(name)`: `math` (math-verify), `exact_match`, `multiple_choice`, `code` (unit tests
in a `CodeSandbox`; `SubprocessSandbox` by default).
"""

from typing import Any

from kat_megatron.verifiers import code_verifier, math_verifier, text_verifiers  # noqa: F401
from kat_megatron.verifiers.base import (
    VERIFIERS,
    Verifier,
    VerifyResult,
    register_verifier,
)
from kat_megatron.verifiers.sandbox import (
    CodeSandbox,
    SandboxConfig,
    SandboxResult,
    SubprocessSandbox,
)

__all__ = [
    "VERIFIERS",
    "CodeSandbox",
    "SandboxConfig",
    "SandboxResult",
    "SubprocessSandbox",
    "Verifier",
    "VerifyResult",
    "get_verifier",
    "register_verifier",
]


def get_verifier(name: str, **kwargs: Any) -> Verifier:
    """Build the verifier registered as `name` (the built-ins are registered by this package's
    imports above); unknown names list the known ones."""
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(VERIFIERS)}")
    return VERIFIERS[name](**kwargs)
