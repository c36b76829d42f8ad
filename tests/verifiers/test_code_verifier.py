"""The code verifier under attack (issue 17): a wrong program never gets credit, whatever it
redefines, prints or writes; the hidden tests stay out of its reach; malformed output is a
scored failure; failures of the machinery are `error` results, not wrong answers.
`.venv/bin/python -m pytest tests/verifiers/test_code_verifier.py`."""

from __future__ import annotations

import pytest

from kat_megatron.verifiers import SandboxResult, get_verifier
from kat_megatron.verifiers.code_verifier import parse_verdict
from kat_megatron.verifiers.sandbox import SandboxUnavailable

pytestmark = pytest.mark.timeout(180)

WRONG = "def add(a, b):\n    return a - b\n"
REF = {
    "tests": [
        "assert add(1, 2) == 3",
        "assert add(2, 2) == 4",
        "import math\nassert math.isclose(add(1.5, 1.5), 3.0)",
        "assert all(map(lambda x: add(x, x) == 2 * x, range(1, 4)))",
    ],
    "timeout_s": 20,
}

HACKS = {
    # redefine what an in-process harness would use
    "shadow_exec": WRONG + "exec = lambda *a, **k: None\n",
    "builtins_exec": WRONG + "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
    "builtins_print": WRONG + "import builtins\nbuiltins.print = lambda *a, **k: None\n",
    "builtins_import": WRONG
    + "import builtins, json\nbuiltins.__import__ = lambda *a, **k: json\n",
    "assertion_error": WRONG
    + "import builtins\nbuiltins.AssertionError = type('A', (Exception,), {})\n",
    "shadow_math": WRONG
    + "class M:\n    def isclose(self, *a, **k):\n        return True\nmath = M()\n",
    "shadow_all": WRONG + "def all(*a):\n    return True\ndef abs(x):\n    return 0\n",
    "always_equal": "class E:\n    __eq__ = lambda s, o: True\n    __bool__ = lambda s: True\n"
    "def add(a, b):\n    return E()\n",
    "stop_iteration": "def add(a, b):\n    raise StopIteration\n",
    # end early with success
    "sys_exit_0": WRONG + "import sys\nsys.exit(0)\n",
    "os_exit_0": WRONG + "import os\nos._exit(0)\n",
    "exit_in_call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    # rewrite what a harness would print
    "stdout_rewrite": WRONG + "import sys, re\n_w = sys.stdout.write\n"
    "sys.stdout.write = lambda s: _w(re.sub(r':0\\n', ':1\\n', s))\n",
}


@pytest.mark.parametrize("program", HACKS.values(), ids=HACKS.keys())
def test_redefining_builtins_or_exiting_early_gets_no_credit(program):
    r = get_verifier("code")(program, REF)
    assert (r.correct, r.score, r.error) == (False, 0.0, None), r.detail


def test_the_right_answer_passes_with_the_same_tests():
    for extra in ("", "import math\nprint('@@kat-0@@0:1')\n", "def all(*a):\n    return False\n"):
        r = get_verifier("code")("def add(a, b):\n    return a + b\n" + extra, REF)
        assert (r.correct, r.score, r.error) == (True, 1.0, None), r.detail


FORGE = {
    # the marker (or anything verdict-like) read from its own program file, or guessed
    "marker_from_own_file": WRONG + "import re, sys\nsrc = open(__file__).read()\n"
    "for m in set(re.findall(r'@@kat-[0-9a-f]+@@', src)):\n    for i in range(4):\n"
    "        print(f'\\n{m}{i}:1')\n",
    "guessed_verdicts": WRONG + "import json, os\nfor fd in (1, 2, 4):\n"
    "    os.write(fd, ('\\n' + json.dumps({'passed': [0, 1, 2, 3]}) + '\\n').encode())\n",
    # the tests read from its own file, to answer by lookup
    "tests_from_own_file": "import re\nsrc = open(__file__).read()\n"
    "T = {(int(a), int(b)): int(c) for a, b, c in re.findall(r'add\\((\\d+), (\\d+)\\) == (\\d+)', src)}\n"
    "def add(a, b):\n    return T.get((a, b), a - b)\n",
    "fake_ready_on_the_channel": WRONG
    + 'import os\nos.write(4, b\'{"ready": true, "names": {}}\\n\')\n',
}


@pytest.mark.parametrize("program", FORGE.values(), ids=FORGE.keys())
def test_forged_verdicts_and_read_tests_get_no_credit(program):
    ref = {"tests": REF["tests"][:2], "timeout_s": 20}
    r = get_verifier("code")(program, ref)
    assert (r.correct, r.score, r.error) == (False, 0.0, None), r.detail


MALFORMED = {
    "marker_garbage": "import re\nfor m in re.findall(r'@@kat-[0-9a-f]+@@', open(__file__).read()):\n"
    "    print(f'\\n{m}x:y:z\\n{m}\\n{m}1\\n')\ndef add(a, b):\n    return a - b\n",
    "not_json": "import os\nos.write(4, b'\\xff\\xfe not json\\n')\n",
    "not_an_object": "import os\nos.write(4, b'[1, 2]\\n\"s\"\\n')\n",
    "deep_nesting": 'import os\nos.write(4, b\'{"ready": true, "names": {"add": {"value": \''
    " + b'[' * 200000 + b'}}}\\n')\n",
    "oversized": "import os\nos.write(4, b'x' * (9 << 20))\n",
    "bad_handle": 'import os\nos.write(4, b\'{"ready": true, "names": {"add": '
    '{"value": {"t": "handle", "v": "x"}}, "1 bad": 3, "print": {"value": 1}}}\\n\')\n',
    "unknown_tag_reply": "import os, json\ndef add(a, b):\n"
    '    os.write(4, b\'{"value": {"t": "pickle", "v": []}}\\n\')\n    return 3\n',
    "huge_int": 'import os\nos.write(4, b\'{"ready": true, "names": {"add": {"value": \''
    " + b'9' * 100000 + b'}}}\\n')\n",
}


@pytest.mark.parametrize("program", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_output_is_a_scored_failure(program):
    r = get_verifier("code")(program, {"tests": REF["tests"][:2], "timeout_s": 20})
    assert (r.correct, r.score, r.error) == (False, 0.0, None), r.detail


def test_judge_semantics_on_plain_data():
    """What the judge supports: data of every wire type, in-place changes of arguments,
    iteration, objects' methods, exceptions, numpy; objects have no truth value."""
    program = (
        "import numpy\ndef sort_in_place(l):\n    l.sort()\ndef gen(n):\n    yield from range(n)\n"
        "class Stack:\n    def __init__(self):\n        self.items = []\n"
        "    def push(self, x):\n        self.items.append(x)\n        return self\n"
        "    def peek(self):\n        return self.items[-1]\n"
        "def data():\n    return (1, 2.5, 'x', b'\\x00', None, True, {1: [2, {3}]}, frozenset(), 1j)\n"
        "def arr():\n    return numpy.arange(3)\ndef check(x):\n    if x < 0:\n"
        "        raise ValueError('negative')\n    return object()\nCONST = 7\n"
    )
    tests = [
        "l = [3, 1, 2]\nsort_in_place(l)\nassert l == [1, 2, 3]",
        "assert list(gen(3)) == [0, 1, 2] and 2 in gen(3)",
        "assert Stack().push(1).push(5).peek() == 5",
        "assert data() == (1, 2.5, 'x', b'\\x00', None, True, {1: [2, {3}]}, frozenset(), 1j)",
        "import numpy as np\nassert np.array_equal(arr(), np.arange(3))",
        "try:\n    check(-1)\n    raise RuntimeError('no exception')\nexcept ValueError:\n    pass",
        "assert CONST == 7",
        "assert check(1)",  # an object is not True
        "assert check(1) == check(1)",  # nor equal to anything but itself
    ]
    r = get_verifier("code")(program, {"tests": tests, "timeout_s": 20})
    assert r.error is None and r.detail == "7/9 tests passed"


def test_timeouts_and_program_errors_are_scored():
    v = get_verifier("code")
    loop = (
        "def add(a, b):\n    if a == 2:\n        while True:\n            pass\n    return a + b\n"
    )
    r = v(loop, {"tests": REF["tests"][:3], "timeout_s": 2})
    assert (r.score, r.error) == (pytest.approx(1 / 3), None) and "(timed out)" in r.detail
    r = v("raise ValueError('boom')", {"tests": REF["tests"][:1]})
    assert (r.score, r.error) == (0.0, None) and "ValueError: boom" in r.detail
    r = v("print('\ud800')\ndef add(a, b):\n    return a + b", {"tests": REF["tests"][:1]})
    assert (r.score, r.error) == (0.0, None)  # unencodable text: the program's failure
    r = v("print('\ud800')", {"cases": [{"input": "", "output": "x"}]})
    assert (r.score, r.error) == (0.0, None)


class RunOnly:
    """A `CodeSandbox` with canned results and no `run_pair`."""

    def __init__(self, result=None, pair=None, exc=None):
        self.result, self.pair, self.exc = result, pair, exc

    def run(self, program, stdin="", timeout_s=10.0):
        if self.exc:
            raise self.exc
        return self.result


class FakeSandbox(RunOnly):
    def run_pair(self, program, peer, timeout_s=10.0, peer_timeout_s=10.0):
        if self.exc:
            raise self.exc
        return self.pair


OK = SandboxResult(0, "", "")
CASES = {"cases": [{"input": "", "output": "3"}]}
TESTS = {"tests": ["assert add(1, 2) == 3"]}


@pytest.mark.parametrize(
    "sandbox,reference,why",
    [
        (FakeSandbox(SandboxResult(None, "", "", error="setup: EPERM")), CASES, "setup: EPERM"),
        (FakeSandbox(pair=(OK, SandboxResult(None, "", "", error="no tmpfs"))), TESTS, "no tmpfs"),
        (FakeSandbox(pair=(OK, SandboxResult(1, "Traceback", "boom"))), TESTS, "no verdict"),
        (FakeSandbox(pair=(OK, SandboxResult(0, '{"passed": [7]}', ""))), TESTS, "no verdict"),
        (FakeSandbox(exc=RuntimeError("bug")), TESTS, "RuntimeError: bug"),
        (RunOnly(OK), TESTS, "no run_pair"),
    ],
)
def test_internal_failures_are_errors_not_wrong_answers(sandbox, reference, why):
    r = get_verifier("code", sandbox=sandbox)("def add(a, b): ...", reference)
    assert r.error and why in r.error and (r.correct, r.score) == (False, 0.0)


def test_no_sandbox_at_all_still_raises():
    with pytest.raises(SandboxUnavailable):
        get_verifier("code", sandbox=FakeSandbox(exc=SandboxUnavailable("no netns")))("x", TESTS)


def test_parse_verdict_rejects_malformed_verdicts():
    assert parse_verdict('junk\n{"passed": [0, 1]}\n', 2) == {"passed": [0, 1]}
    for bad in ("", "junk", '{"passed": [0, 0]}', '{"passed": [2]}', '{"passed": "0"}', "[]"):
        assert parse_verdict(bad, 2) is None
