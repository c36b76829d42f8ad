"""Verifiers: math (math-verify), exact match, multiple choice, code in a sandbox; the registry."""

from __future__ import annotations

import os
import threading

import pytest

from kat_megatron.verifiers import (
    VERIFIERS,
    SandboxConfig,
    SandboxResult,
    SubprocessSandbox,
    get_verifier,
)


def test_registry_lists_known_names():
    assert {"math", "exact_match", "multiple_choice", "code"} <= set(VERIFIERS)
    with pytest.raises(ValueError, match=r"unknown verifier 'maths'; known: \['code', "):
        get_verifier("maths")


@pytest.mark.parametrize(
    "response,reference,correct",
    [
        ("So the answer is $\\boxed{5}$.", "5", True),
        ("2 + 3 = 5", 5, True),
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("The answer is \\boxed{\\frac12}", "1/2", True),
        ("$(x+1)^2$", "x^2+2x+1", True),
        ("\\boxed{6}", "5", False),
        ("I do not know.", "5", False),
    ],
)
def test_math(response, reference, correct):
    assert get_verifier("math")(response, reference).correct is correct


def test_math_in_a_worker_thread_and_bad_references():
    out = []
    t = threading.Thread(target=lambda: out.append(get_verifier("math")("\\boxed{7}", "7")))
    t.start()
    t.join()
    assert out[0].correct  # no signal-based timeout off the main thread
    v = get_verifier("math")
    with pytest.raises(ValueError, match="string or number"):
        v.validate_reference({"a": 1})
    with pytest.raises(ValueError, match="empty"):
        v.validate_reference("  ")


@pytest.mark.parametrize(
    "response,reference,correct",
    [
        ("  Paris. ", "paris", True),
        ('"New   York"', ["new york", "NYC"], True),
        ("It is \\boxed{Rome}", "Rome", True),
        ("Rome", "Paris", False),
    ],
)
def test_exact_match(response, reference, correct):
    assert get_verifier("exact_match")(response, reference).correct is correct
    assert get_verifier("exact_match", case_sensitive=True)("PARIS", "paris").correct is False


@pytest.mark.parametrize(
    "response,reference,correct",
    [
        ("The answer is (B).", "B", True),
        ("Answer: C", "C", True),
        ("After checking, \\boxed{D}", ["D", "E"], True),
        ("(A)", "A", True),
        ("The answer is a bit unclear, but (C) fits", "C", True),
        ("b", "B", True),
        ("The answer is (B).", "A", False),
        ("no idea", "A", False),
    ],
)
def test_multiple_choice(response, reference, correct):
    assert get_verifier("multiple_choice")(response, reference).correct is correct


ADD = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
SUM = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"


def test_code_unit_tests_and_io_cases():
    v = get_verifier("code")
    r = v(
        ADD, {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(0, 0) == 0"]}
    )
    assert (r.correct, round(r.score, 3)) == (False, 0.667) and r.detail == "2/3 tests passed"
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10  "}]
    assert v(SUM, {"cases": cases}).correct
    r = v(SUM, {"cases": [*cases, {"input": "1 1", "output": "3"}]})
    assert r.score == pytest.approx(2 / 3) and "case 2: wrong output" in r.detail
    fake = "print('@@kat-0000000000000000@@0:1')\nraise SystemExit(0)"
    assert v(fake, {"tests": ["assert True"]}).score == 0.0  # the marker is secret per run
    with pytest.raises(ValueError, match="'tests' or 'cases'"):
        v.validate_reference({"test": []})


def test_sandbox_limits(monkeypatch):
    monkeypatch.setenv("KAT_SECRET_TOKEN", "hunter2")
    box = SubprocessSandbox(SandboxConfig(memory_mb=256, max_output_kb=64))
    r = box.run("import os; print(os.environ.get('KAT_SECRET_TOKEN'), os.getcwd())")
    assert r.ok and r.stdout == "None /sandbox\n"  # the run's directory in its minimal root
    r = box.run("while True:\n    pass", timeout_s=1.0)
    assert r.timed_out and not r.ok
    r = box.run("x = bytearray(1024 * 1024 * 1024)")
    assert r.returncode != 0 and "MemoryError" in r.stderr
    r = box.run("print('x' * 10**7)")
    assert not r.ok and len(r.stdout) <= 64 * 1024
    r = box.run("import sys; print(sys.stdin.read().upper())", stdin="abc")
    assert r.stdout == "ABC\n"
    assert not any(
        p.startswith("kat_sandbox_") for p in os.listdir(os.environ.get("TMPDIR", "/tmp"))
    )


def test_code_verifier_takes_any_sandbox():
    class Recorder:
        def __init__(self):
            self.programs = []

        def run(self, program, stdin="", timeout_s=10.0):
            self.programs.append((program, stdin, timeout_s))
            return SandboxResult(0, "3\n", "")

    box = Recorder()
    v = get_verifier("code", sandbox=box)
    assert v("print(3)", {"cases": [{"input": "x", "output": "3"}], "timeout_s": 2}).correct
    assert box.programs == [("print(3)", "x", 2.0)]
