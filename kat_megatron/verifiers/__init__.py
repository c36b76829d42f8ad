"""Answer verifiers shared by the data pipelines and RL rewards, selected by name.

`get_verifier(name)`: `math` (math-verify), `exact_match`, `multiple_choice`, `code` (unit tests
in a `CodeSandbox`; `SubprocessSandbox` by default).
"""

from kat_megatron.verifiers import code_verifier, math_verifier, text_verifiers  # noqa: F401
from kat_megatron.verifiers.base import (
    VERIFIERS,
    Verifier,
    VerifyResult,
    get_verifier,
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
