"""`get_verifier("code")`: run the response's program against unit tests in a `CodeSandbox`.

`python -c "from kat_megatron.verifiers import get_verifier; print(get_verifier('code')(
'def add(a, b):\\n    return a + b', {'tests': ['assert add(1, 2) == 3']}))"`

Reference (a JSON object), one of:
- `{"tests": ["assert add(1, 2) == 3", ...]}`: statements run after the program, each on its own
  (one failing test does not stop the others); score = fraction passed. The tests run in a
  second sandbox, the judge, which calls into the program over a data-only channel and
  decides every assert itself (`code_harness`, docs/sandbox.md): the program can neither read
  the tests nor forge a pass. Needs a sandbox with `run_pair` (`SubprocessSandbox`);
- `{"cases": [{"input": "1 2\\n", "output": "3\\n"}, ...]}`: one run per case, stdin -> stdout,
  compared here line by line with trailing whitespace ignored (exit status 0 required);
optionally `"timeout_s"` (per run). The program is the last fenced code block of the response
(```python ...```), else the whole response. `correct` means every test passed.

A failure of the machinery (the sandbox could not run, the judge gave no verdict) is not a
wrong answer: the result then has `error` set (score 0) and callers must not train on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kat_megatron.verifiers.base import VerifyResult, register_verifier
from kat_megatron.verifiers.sandbox import (
    CodeSandbox,
    SandboxResult,
    SandboxUnavailable,
    SubprocessSandbox,
)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)
_HARNESS = Path(__file__).with_name("code_harness.py").read_text()
_MARGIN_S = 2.0
"""Extra wall time of the two sandboxes over the judge's own deadline."""


def extract_code(response: str) -> str:
    """The last fenced code block of `response` (any language tag), else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1][1] if blocks else response


def runner_program(code: str) -> str:
    """The program's sandbox: the harness, then `run_program(code)`."""
    return f"{_HARNESS}\nrun_program({code!r})\n"


def judge_program(tests: list[str], timeout_s: float, setup_s: float) -> str:
    """The judge's sandbox: the harness, then `run_judge(tests, ...)`."""
    return f"{_HARNESS}\nrun_judge(json.loads({json.dumps(tests)!r}), {timeout_s!r}, {setup_s!r})\n"


def _norm_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else ""


def _internal(detail: str, result: SandboxResult | None = None) -> VerifyResult:
    why = detail + (f": {result.error}" if result is not None and result.error else "")
    return VerifyResult(False, 0.0, why, error=why)


def parse_verdict(stdout: str, n_tests: int) -> dict | None:
    """The judge's verdict (its last stdout line), or None when it is not a valid one."""
    try:
        verdict = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("passed"), list):
        return None
    passed = verdict["passed"]
    if not all(type(i) is int and 0 <= i < n_tests for i in passed) or len(set(passed)) < len(
        passed
    ):
        return None
    return verdict


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
        """Raises ValueError for an invalid reference (a data error); anything else that goes
        wrong here is returned as a result with `error`."""
        self.validate_reference(reference)
        code = extract_code(response)
        timeout = float(reference.get("timeout_s", self.timeout_s))
        try:
            if reference.get("tests") is not None:
                return self._run_tests(code, reference["tests"], timeout)
            return self._run_cases(code, reference["cases"], timeout)
        except SandboxUnavailable:  # no safe sandbox on this machine at all: fail loudly
            raise
        except Exception as e:
            return _internal(f"code verifier: {type(e).__name__}: {e}")

    def _run_tests(self, code: str, tests: list[str], timeout: float) -> VerifyResult:
        run_pair = getattr(self.sandbox, "run_pair", None)
        if run_pair is None:
            return _internal(f"{type(self.sandbox).__name__} has no run_pair: tests need a judge")
        config = getattr(self.sandbox, "config", None)
        setup = float(getattr(config, "setup_timeout_s", 60.0))
        program, judge = run_pair(
            runner_program(code),
            judge_program(tests, timeout, setup),
            timeout_s=timeout + setup + _MARGIN_S,  # the judge ends it sooner
            peer_timeout_s=timeout + setup + _MARGIN_S,
        )
        if program.error or judge.error:
            return _internal("sandbox failed", program if program.error else judge)
        verdict = parse_verdict(judge.stdout, len(tests))
        if judge.timed_out or verdict is None:
            why = "timed out" if judge.timed_out else f"exit {judge.returncode}"
            return _internal(f"judge gave no verdict ({why}; {_last_line(judge.stderr)})")
        passed = len(verdict["passed"])
        detail = f"{passed}/{len(tests)} tests passed"
        if verdict.get("timed_out"):
            detail += " (timed out)"
        elif not passed:
            why = verdict.get("program_error") or _last_line(program.stderr)
            failed = verdict.get("failed")
            if not why and isinstance(failed, dict) and failed:
                why = str(next(iter(failed.values())))
            detail += f"; {str(why)[:200]}" if why else ""
        return VerifyResult(passed == len(tests), passed / len(tests), detail)

    def _run_cases(self, code: str, cases: list[dict[str, str]], timeout: float) -> VerifyResult:
        passed = 0
        notes = []
        for i, case in enumerate(cases):
            result = self.sandbox.run(code, stdin=case.get("input", ""), timeout_s=timeout)
            if result.error:
                return _internal(f"sandbox failed on case {i}", result)
            good = result.ok and not result.truncated
            if good and _norm_output(result.stdout) == _norm_output(case["output"]):
                passed += 1
            elif len(notes) < 3:
                why = "timed out" if result.timed_out else f"exit {result.returncode}"
                why = "output truncated" if result.ok and result.truncated else why
                notes.append(f"case {i}: {why if not good else 'wrong output'}")
        detail = f"{passed}/{len(cases)} cases passed" + (f" ({'; '.join(notes)})" if notes else "")
        return VerifyResult(passed == len(cases), passed / len(cases), detail)
