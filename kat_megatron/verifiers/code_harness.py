"""Unit tests judged outside the untrusted program: the runner (in the program's sandbox), the
judge (in a second sandbox) and the data-only wire format between them (docs/sandbox.md).

`CodeVerifier` builds both programs (`runner_program`, `judge_program`) and runs them with
`SubprocessSandbox.run_pair`; this file is also their source, so it uses the standard library
only and no `from __future__` import. The runner executes the response's program as
`__main__`, then serves requests from the judge: call a function, read an attribute, iterate.
Values cross as plain data (numbers, strings, bytes, lists, tuples, dicts, sets, numpy arrays)
or as opaque handles; the judge executes each test in its own interpreter, where the program's
names are `Remote` proxies that forward only calls, attribute access, indexing, iteration,
len and str. Comparisons, truth tests and everything an assert decides happen in the judge on
plain data, so nothing the program does (redefining builtins, exiting early, printing markers,
returning objects equal to everything) can make a test pass; the tests are never in the
program's sandbox. A test passes when it runs to its end without an exception.
"""

import builtins
import json
import os
import select
import signal
import sys
import time
import types

MAX_MESSAGE = 8 << 20
"""Bytes of one message; a longer one breaks the channel (the test fails)."""
MUTABLE = (list, dict, set, bytearray)
STDLIB = getattr(sys, "stdlib_module_names", None) or {
    "array", "bisect", "cmath", "collections", "copy", "datetime", "decimal", "fractions",
    "functools", "heapq", "itertools", "json", "math", "operator", "os", "random", "re",
    "statistics", "string", "sys", "time", "typing",
}  # fmt: skip
"""Standard module names (Python < 3.10 has no `sys.stdlib_module_names`: the common ones)."""
ALIASES = {"np": "numpy"}
"""Names that are always the judge's module (a program claiming otherwise is not believed)."""
HIDDEN_EXCEPTIONS = {"StopIteration", "StopAsyncIteration"}
"""Re-raised as RemoteError: they would end the judge's own loops (e.g. `all(map(f, xs))`)."""


class ProtocolError(Exception):
    """The other side sent something that is not a valid message."""


class RemoteError(Exception):
    """The program raised an exception the judge does not re-raise as itself."""


class Channel:
    """JSON lines over two pipes (fd 3 in, fd 4 out)."""

    def __init__(self, fd_in=3, fd_out=4):
        self.fd_in, self.fd_out, self.buf, self.broken = fd_in, fd_out, b"", None

    def send(self, msg):
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        while data:
            data = data[os.write(self.fd_out, data) :]

    def recv(self, timeout=None):
        """The next message; ProtocolError on EOF, garbage, size or timeout."""
        if self.broken:
            raise ProtocolError(self.broken)
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and (left <= 0 or not select.select([self.fd_in], [], [], left)[0]):
                raise ProtocolError("no answer in time")
            chunk = os.read(self.fd_in, 1 << 16)
            if not chunk:
                self.broken = "the program's process ended"
                raise ProtocolError(self.broken)
            self.buf += chunk
            if len(self.buf) > MAX_MESSAGE and b"\n" not in self.buf:
                self.broken = f"message over {MAX_MESSAGE} bytes"
                raise ProtocolError(self.broken)
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"malformed message: {type(e).__name__}") from None
        if not isinstance(msg, dict):
            raise ProtocolError("malformed message: not an object")
        return msg


def encode(value, handle=None):
    """`value` as JSON data: plain data as itself or tagged; anything else through `handle`."""
    t = type(value)
    if t is int and abs(value) >= 1 << 63:  # hex: not subject to the int-to-decimal limit
        return {"t": "int", "v": format(value, "x")}
    if value is None or t in (bool, int, str, float):
        return value
    if t is list:
        return [encode(v, handle) for v in value]
    if t in (tuple, set, frozenset):
        return {"t": t.__name__, "v": [encode(v, handle) for v in value]}
    if t is dict:
        return {
            "t": "dict",
            "v": [[encode(k, handle), encode(v, handle)] for k, v in value.items()],
        }
    if t in (bytes, bytearray):
        return {"t": t.__name__, "v": value.hex()}
    if t is complex:
        return {"t": "complex", "v": [value.real, value.imag]}
    if t.__module__ == "numpy" and hasattr(value, "tolist") and hasattr(value, "dtype"):
        kind = "ndarray" if t.__name__ == "ndarray" else "npscalar"
        return {"t": kind, "dtype": str(value.dtype), "v": encode(value.tolist(), handle)}
    if handle is None:
        raise ProtocolError(f"cannot send a {t.__name__} as data")
    return {"t": "handle", "v": handle(value)}


def decode(obj, resolve):
    """Inverse of `encode` over untrusted input: builds plain data only; handles via `resolve`."""
    if obj is None or type(obj) in (bool, int, str, float):
        return obj
    if type(obj) is list:
        return [decode(v, resolve) for v in obj]
    if type(obj) is not dict or not isinstance(obj.get("t"), str):
        raise ProtocolError("malformed value")
    tag, v = obj["t"], obj.get("v")
    if tag == "handle" and type(v) is int:
        return resolve(v)
    if tag == "int" and type(v) is str and v.lstrip("-").isalnum():
        return int(v, 16)
    if tag in ("bytes", "bytearray") and type(v) is str:
        return getattr(builtins, tag).fromhex(v)
    if type(v) is not list:
        raise ProtocolError(f"malformed {tag}")
    if tag in ("tuple", "set", "frozenset"):
        return getattr(builtins, tag)(decode(x, resolve) for x in v)
    if tag == "dict" and all(type(kv) is list and len(kv) == 2 for kv in v):
        return {decode(k, resolve): decode(x, resolve) for k, x in v}
    if tag == "complex" and len(v) == 2 and all(type(x) in (int, float) for x in v):
        return complex(*v)
    if tag in ("ndarray", "npscalar") and isinstance(obj.get("dtype"), str):
        import numpy

        array = numpy.array(decode(v, resolve), dtype=numpy.dtype(obj["dtype"]))
        return array if tag == "ndarray" else array[()]
    raise ProtocolError(f"malformed {tag}")


# ---- runner: inside the program's sandbox ----


def run_program(source):
    """Execute `source` as `__main__`, then answer the judge until it says exit."""
    chan, handles, ids = Channel(), [], {}

    def handle(obj):  # one handle per object (kept alive here, so ids stay unique)
        if id(obj) not in ids:
            ids[id(obj)] = len(handles)
            handles.append(obj)
        return ids[id(obj)]

    def resolve(i):
        if not 0 <= i < len(handles):
            raise ProtocolError(f"no handle {i}")
        return handles[i]

    chan.send({"hello": 1})
    module = types.ModuleType("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module
    try:
        exec(compile(source, "main.py", "exec"), module.__dict__)
    except BaseException as e:  # SystemExit too: a program that ends early defines nothing
        chan.send({"ready": False, "error": f"{type(e).__name__}: {e}"[:500]})
        return
    names = {}
    for name, value in list(module.__dict__.items()):
        if name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            names[name] = {"module": value.__name__}
        else:
            try:  # small plain data as itself, the rest (functions, classes, ...) by handle
                enc = encode(value)
                if len(json.dumps(enc)) > 1 << 16:
                    raise ValueError
            except (ProtocolError, RecursionError, ValueError, TypeError):
                enc = {"t": "handle", "v": handle(value)}
            names[name] = {"value": enc}
    chan.send({"ready": True, "names": names})
    while True:
        try:
            req = chan.recv()
        except ProtocolError:
            return
        if req.get("op") == "exit":
            return
        chan.send(answer(req, handle, resolve))


def answer(req, handle, resolve):
    """One request: {"op", "target", ...} -> {"value": ...} or {"raise": name, "message"}."""
    try:
        target = decode(req.get("target"), resolve)
        op = req.get("op")
        if op == "call":
            args = decode(req.get("args"), resolve)
            kwargs = decode(req.get("kwargs"), resolve)
            value = target(*args, **kwargs)
            back = {str(i): encode(a, handle) for i, a in enumerate(args) if type(a) in MUTABLE}
            return {"value": encode(value, handle), "back": back}
        if op == "getattr":
            return {"value": encode(getattr(target, str(req.get("name"))), handle)}
        if op == "setattr":
            setattr(target, str(req.get("name")), decode(req.get("value"), resolve))
            return {"value": None}
        if op == "getitem":
            return {"value": encode(target[decode(req.get("key"), resolve)], handle)}
        if op in ("len", "str", "repr"):
            return {"value": encode(getattr(builtins, op)(target), handle)}
        if op == "iter":
            return {"value": encode(iter(target), handle)}
        if op == "next":
            return {"value": encode(next(target), handle)}
        raise ProtocolError(f"unknown op {op!r}")
    except BaseException as e:
        return {"raise": type(e).__name__, "message": str(e)[:500]}


# ---- judge: in its own sandbox; the tests never leave it ----


class Deadline(BaseException):
    """The run's time is up (raised by SIGALRM inside whatever test is running)."""


class Remote:
    """A program object, seen by the judge: forwards calls, attributes, indexing, iteration,
    len and str/repr; compares by identity and has no truth value."""

    __slots__ = ("_id",)
    link = None  # the judge's Link

    def __init__(self, i):
        object.__setattr__(self, "_id", i)

    def _ask(self, op, **kw):
        return Remote.link.ask(op, target={"t": "handle", "v": self._id}, **kw)

    def __call__(self, *args, **kwargs):
        return Remote.link.call(self._id, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", name=name)

    def __setattr__(self, name, value):
        self._ask("setattr", name=name, value=Remote.link.encode(value))

    def __getitem__(self, key):
        return self._ask("getitem", key=Remote.link.encode(key))

    def __len__(self):
        return _typed(self._ask("len"), int)

    def __str__(self):
        return _typed(self._ask("str"), str)

    def __repr__(self):
        return _typed(self._ask("repr"), str)

    def __iter__(self):
        it = self._ask("iter")
        return it if isinstance(it, Remote) else iter(_typed(it, list))

    def __next__(self):
        return self._ask("next")

    def __bool__(self):
        raise TypeError("the judge gives a program object no truth value: compare plain data")


def _typed(value, kind):
    if type(value) is not kind:
        raise ProtocolError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


class Link:
    """The judge's side of the channel: requests, decoding, exceptions."""

    def __init__(self, chan):
        self.chan, self.remotes = chan, {}

    def remote(self, i):
        """One `Remote` per program object, so `is` works across calls."""
        return self.remotes.setdefault(i, Remote(i))

    def encode(self, value):
        return encode(value, lambda obj: _remote_id(obj))

    def ask(self, op, **kw):
        self.chan.send(dict(kw, op=op))
        reply = self.chan.recv()
        if "raise" in reply:
            name, message = str(reply["raise"]), str(reply.get("message", ""))
            cls = getattr(builtins, name, None)
            if op == "next" and name == "StopIteration":
                raise StopIteration
            if (
                isinstance(cls, type)
                and issubclass(cls, Exception)
                and name not in HIDDEN_EXCEPTIONS
            ):
                raise cls(message)
            raise RemoteError(f"{name}: {message}")
        if "value" not in reply:
            raise ProtocolError("malformed reply")
        self.last = reply
        return decode(reply["value"], self.remote)

    def call(self, i, args, kwargs):
        enc_args = [self.encode(a) for a in args]
        enc_kwargs = {"t": "dict", "v": [[k, self.encode(v)] for k, v in kwargs.items()]}
        value = self.ask("call", target={"t": "handle", "v": i}, args=enc_args, kwargs=enc_kwargs)
        back = self.last.get("back")
        for key, new in back.items() if isinstance(back, dict) else ():
            pos = int(key) if key.isdigit() else -1
            if 0 <= pos < len(args) and type(args[pos]) in MUTABLE:
                _update(args[pos], decode(new, self.remote))
        return value


def _remote_id(obj):
    if isinstance(obj, Remote):
        return object.__getattribute__(obj, "_id")
    raise ProtocolError(f"cannot send a {type(obj).__name__} to the program")


def _update(arg, new):
    """Copy the program's in-place change of a list/dict/set/bytearray argument back."""
    if type(new) is not type(arg):
        raise ProtocolError("an argument came back as another type")
    if isinstance(arg, dict):
        arg.clear()
        arg.update(new)
    elif isinstance(arg, set):
        arg.clear()
        arg |= new
    else:
        arg[:] = new


def called_names(tests):
    """Names the tests call directly (`f(...)`): the program's functions under test."""
    import ast

    out = set()
    for source in tests:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                out.add(node.func.id)
    return out


def test_globals(names, tests, remote):
    """The tests' namespace: the program's names as `Remote`s or data; builtins and modules
    are the judge's own: a program cannot stand in for `abs`, or for `math` (any standard
    module name the tests do not call as a function) or a module it says it imported."""
    env = {"__name__": "__test__", "__builtins__": builtins}
    called = called_names(tests)
    for name, entry in names.items() if isinstance(names, dict) else ():
        if not (isinstance(name, str) and name.isidentifier()) or hasattr(builtins, name):
            continue
        module = entry.get("module") if isinstance(entry, dict) else None
        module = ALIASES.get(name) or module
        if isinstance(module, str) or (name in STDLIB and name not in called):
            try:
                env[name] = __import__(module if isinstance(module, str) else name)
                for part in (module or name).split(".")[1:]:
                    env[name] = getattr(env[name], part)
            except Exception:
                pass
        elif isinstance(entry, dict) and "value" in entry:
            try:
                env[name] = decode(entry["value"], remote)
            except (ProtocolError, RecursionError, ValueError, TypeError):
                pass
    return env


def run_judge(tests, timeout_s, setup_s):
    """Run each test against the program behind fds 3/4; print the verdict as one JSON line."""
    chan = Channel()
    Remote.link = link = Link(chan)
    verdict = {"passed": [], "failed": {}, "program_error": None, "timed_out": False}

    def expire(*_):
        verdict["timed_out"] = True
        raise Deadline

    try:
        chan.recv(timeout=setup_s)  # hello: the program's interpreter has started
        signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        ready = chan.recv()
        if ready.get("ready") is not True:
            raise RemoteError(str(ready.get("error", "no program"))[:500])
        env = test_globals(ready.get("names"), tests, link.remote)
        sys.stdout = sys.stderr  # whatever the tests print stays off the verdict's stream
        for i, source in enumerate(tests):
            try:
                exec(compile(source, f"<test {i}>", "exec"), env)
                verdict["passed"].append(i)
            except Deadline:
                raise
            except BaseException as e:
                if len(verdict["failed"]) < 10:  # the verdict stays small
                    verdict["failed"][str(i)] = f"{type(e).__name__}: {e}"[:300]
            if verdict["timed_out"]:  # a test swallowed the Deadline
                raise Deadline
    except Deadline:
        pass
    except (ProtocolError, RemoteError, OSError) as e:
        verdict["program_error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        link.chan.send({"op": "exit"})
    except OSError:
        pass
    os.write(1, ("\n" + json.dumps(verdict) + "\n").encode())
