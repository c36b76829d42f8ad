"""`get_verifier("code")`: run the response's program against unit tests in a `CodeSandbox`.

Reference (a JSON object), one of:
- `{"tests": ["assert add(1, 2) == 3", ...]}`: statements run after the program, each on its own
  (one failing test does not stop the others); score = fraction passed;
- `{"cases": [{"input": "1 2\\n", "output": "3\\n"}, ...]}`: one run per case, stdin -> stdout,
  compared line by line with trailing whitespace ignored;
optionally `"timeout_s"` (per run). The program is the last fenced code block of the response
(```python ...```), else the whole response. `correct` means every test passed.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kat_megatron.verifiers.base import VerifyResult, register_verifier
from kat_megatron.verifiers.sandbox import CodeSandbox, SubprocessSandbox

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)

_HARNESS = """

def _kat_run_tests():
    import json as _json, sys as _sys
    for _i, _src in enumerate(_json.loads({tests!r})):
        try:
            exec(_src, globals())
            _ok = True
        except BaseException:
            _ok = False
        _sys.stdout.write("\\n{marker}%d:%d\\n" % (_i, _ok))
        _sys.stdout.flush()


_kat_run_tests()
"""


def extract_code(response: str) -> str:
    """The last fenced code block of `response` (any language tag), else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1][1] if blocks else response


def _norm_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


@register_verifier("code")
@dataclass
class CodeVerifier:
    """Unit-test verifier; `sandbox` is any `CodeSandbox` (default `SubprocessSandbox()`)."""

    name: ClassVar[str] = "code"
    sandbox: CodeSandbox = field(default_factory=SubprocessSandbox)
    timeout_s: float = 10.0
    """Per run, unless the reference gives `timeout_s`."""

    def validate_reference(self, reference: Any) -> None:
        if not isinstance(reference, dict):
            raise ValueError("code reference must be an object with 'tests' or 'cases'")
        tests, cases = reference.get("tests"), reference.get("cases")
        if tests is not None:
            if (
                not isinstance(tests, list)
                or not tests
                or not all(isinstance(t, str) for t in tests)
            ):
                raise ValueError("code reference 'tests' must be a non-empty list of strings")
        elif isinstance(cases, list) and cases:
            for c in cases:
                if not (isinstance(c, dict) and isinstance(c.get("input", ""), str)
                        and isinstance(c.get("output"), str)):  # fmt: skip
                    raise ValueError("code reference 'cases' need string 'input' and 'output'")
        else:
            raise ValueError("code reference needs a non-empty 'tests' or 'cases' list")

    def __call__(self, response: str, reference: Any) -> VerifyResult:
        self.validate_reference(reference)
        code = extract_code(response)
        timeout = float(reference.get("timeout_s", self.timeout_s))
        if reference.get("tests") is not None:
            return self._run_tests(code, reference["tests"], timeout)
        return self._run_cases(code, reference["cases"], timeout)

    def _run_tests(self, code: str, tests: list[str], timeout: float) -> VerifyResult:
        marker = f"@@kat-{secrets.token_hex(8)}@@"
        program = code + _HARNESS.format(tests=json.dumps(tests), marker=marker)
        result = self.sandbox.run(program, timeout_s=timeout)
        passed = set()
        for line in result.stdout.splitlines():
            if line.startswith(marker):
                index, ok = line[len(marker) :].split(":")
                if ok == "1":
                    passed.add(int(index))
        score = len(passed) / len(tests)
        detail = f"{len(passed)}/{len(tests)} tests passed"
        if result.timed_out:
            detail += " (timed out)"
        elif not passed and result.stderr:
            detail += f"; stderr: {result.stderr.strip().splitlines()[-1][:200]}"
        return VerifyResult(len(passed) == len(tests), score, detail)

    def _run_cases(self, code: str, cases: list[dict[str, str]], timeout: float) -> VerifyResult:
        passed = 0
        notes = []
        for i, case in enumerate(cases):
            result = self.sandbox.run(code, stdin=case.get("input", ""), timeout_s=timeout)
            if result.ok and _norm_output(result.stdout) == _norm_output(case["output"]):
                passed += 1
            elif len(notes) < 3:
                why = "timed out" if result.timed_out else f"exit {result.returncode}"
                notes.append(f"case {i}: {why if not result.ok else 'wrong output'}")
        detail = f"{passed}/{len(cases)} cases passed" + (f" ({'; '.join(notes)})" if notes else "")
        return VerifyResult(passed == len(cases), passed / len(cases), detail)
