"""Run untrusted Python programs: the `CodeSandbox` interface and a subprocess implementation.

`python -c "from kat_megatron.verifiers.sandbox import SubprocessSandbox; print(
SubprocessSandbox().run('print(1 + 1)'))"`

`SubprocessSandbox.run` starts a small launcher (`python -I`, own session, minimal environment)
that isolates the program with Linux namespaces and rlimits, then `exec`s `python -I -B main.py`
in a fresh private directory (docs/step_srpo.md, "Code-execution sandbox"):
- network: a new network namespace (only a loopback interface, down): every connection fails,
  the host's loopback services included. If the namespace cannot be created the sandbox
  refuses to run (`SandboxUnavailable`) unless `allow_network_fallback=True`;
- processes: a new PID namespace whose init is the launcher's child: when the program exits or
  the launcher is killed (wall-clock timeout: the host kills the launcher's process group; the
  init has PR_SET_PDEATHSIG), the kernel kills everything left in the namespace.
  RLIMIT_NPROC counts per real uid, and root ignores it, so as root the program runs under a
  uid of its own (`UID_BASE + launcher pid`, unique among live sandboxes): `max_processes`
  then bounds exactly this run (fork bombs fail with EAGAIN);
- file system: a private mount namespace in which every mount is remounted read-only except
  the run's directory (bind-mounted read-write, owned by the program's uid), plus a fresh
  /proc of the PID namespace; the unprivileged uid is a second barrier. Directories on the
  interpreter's path that other users may not traverse (e.g. /root, 0700, holding a pyenv
  Python) are covered by an empty tmpfs holding only that path. Reads of world-readable
  files are not blocked;
- rlimits: address space (`memory_mb`), CPU seconds, file size (stdout/stderr are files, so it
  caps output too), no core dumps.
Not root: the namespaces are created inside a user namespace (where the kernel allows it) and
the program runs in a nested one, so it holds no privilege over the read-only mounts; its
RLIMIT_NPROC is counted per user namespace (Linux >= 5.14).
Not covered: aggregate memory across processes (each may use `memory_mb`; a cgroup would bound
the sum) and CPU time across processes. `SandboxResult.violation` names the limit a failed run
most likely hit (from the exit signal and the stderr text: best effort).
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

UID_BASE = 1_500_000_000
"""Per-run uids (root only) are UID_BASE + the launcher's pid; no account needs to exist."""
_REFUSED = 97

_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
a = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
NS, PID, NET, USER = 0x20000, 0x20000000, 0x40000000, 0x10000000
RO, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, MOVE, REC = 1, 2, 4, 8, 32, 4096, 8192, 16384
PRIVATE = 1 << 18
KEEP = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC, "noatime": 1024,
        "nodiratime": 2048, "relatime": 1 << 21}
root, work, parent = os.geteuid() == 0, os.getcwd(), os.getpid()
iso = {"network": False, "pid": False, "readonly_fs": False, "uid": os.getuid(), "notes": []}
def mount(src, dst, fs, flags, data=None):
    e = lambda s: None if s is None else s.encode()
    if libc.mount(e(src), e(dst), e(fs), flags, e(data)) == 0:
        return True
    iso["notes"].append(f"mount {dst}: {os.strerror(ctypes.get_errno())}")
    return False
def userns(uid_map, gid_map):
    for f, s in (("setgroups", "deny"), ("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/self/{f}", "w") as fh:
            fh.write(s)
def expose(path):
    # Cover each ancestor of the (resolved) `path` that others may not traverse (e.g. /root,
    # 0700) with an empty world-traversable tmpfs that holds only the next component.
    cur = "/"
    for name in os.path.normpath(path).split("/")[1:]:
        nxt = os.path.join(cur, name)
        if not os.path.exists(nxt):
            return
        if cur != "/" and not os.stat(cur).st_mode & 0o001:
            if a["stash"].startswith(cur + "/"):
                return iso["notes"].append(f"cannot expose {nxt}: the run directory is inside")
            stash = a["stash"] + ("" if os.path.isdir(nxt) else ".file")
            if not (mount(nxt, stash, None, BIND | REC)
                    and mount("tmpfs", cur, "tmpfs", NOSUID | NODEV, "mode=0755")):
                return
            os.mkdir(nxt) if os.path.isdir(stash) else open(nxt, "w").close()
            mount(stash, nxt, None, MOVE)
            iso["notes"].append(f"exposed {nxt} on a tmpfs over {cur}")
        cur = nxt
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if a["namespaces"]:
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(NS | PID | NET | (0 if root else USER)) == 0:
        if not root:
            userns(f"0 {uid} 1", f"0 {gid} 1")
        iso["network"] = iso["pid"] = True
        private = mount(None, "/", None, REC | PRIVATE)
        if private and root and a["drop"]:
            for path in a["expose"]:
                expose(path)
        if a["readonly_fs"] and private and mount(work, work, None, BIND):
            ok = True
            for line in open("/proc/self/mountinfo"):
                f = line.split()
                point = f[4].encode().decode("unicode_escape")
                if point != work:
                    keep = sum(KEEP.get(o, 0) for o in f[5].split(","))
                    ok &= mount(None, point, None, REMOUNT | BIND | RO | keep)
            iso["readonly_fs"] = ok
            os.chdir(work)  # re-resolve: the cwd still points into the (now read-only) old mount
    else:
        iso["notes"].append(f"unshare: {os.strerror(ctypes.get_errno())}")
def reachable(path):  # every directory on the path traversable by others
    parts = os.path.normpath(path).split("/")[1:]
    dirs = ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return all(os.stat(d).st_mode & 1 for d in dirs if os.path.isdir(d))
run_uid = (a["uid"] or UID_BASE + parent) if root and a["drop"] else None
if run_uid is not None and not all(reachable(p) for p in a["expose"]):
    iso["notes"].append("kept uid 0: the interpreter is not reachable by other users")
    run_uid = None
iso["uid"] = run_uid if run_uid is not None else iso["uid"]
refuse = not iso["network"] and not a["allow_net"]
with os.fdopen(a["report_fd"], "w") as rep:
    json.dump(dict(iso, refused=refuse), rep)
if refuse:
    os._exit(REFUSED)
if run_uid is not None:
    os.chown(work, run_uid, run_uid)
r, w = os.pipe()
alive_r, alive_w = os.pipe()  # EOF on alive_r: the launcher is gone
if os.fork() == 0:  # pid 1 of the new PID namespace
    os.close(r)
    os.close(alive_w)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    os.set_blocking(alive_r, False)
    try:
        if os.read(alive_r, 1) == b"":
            os._exit(1)
    except BlockingIOError:
        pass
    os.close(alive_r)
    if iso["pid"] and a["readonly_fs"]:
        mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
    user = os.fork()
    if user == 0:
        os.close(w)
        for k in ("AS", "CPU", "FSIZE", "NPROC"):
            if a[k] > 0:
                resource.setrlimit(getattr(resource, "RLIMIT_" + k), (a[k], a[k] + (k == "CPU")))
        if run_uid is not None:
            os.setgroups([]); os.setgid(run_uid); os.setuid(run_uid)
        elif iso["pid"] and not root and libc.unshare(USER | NS) == 0:
            userns("1000 0 1", "1000 0 1")  # nested: no capability over the read-only mounts
        try:
            os.execv(a["python"], [a["python"], "-I", "-B", "main.py"])
        except OSError as e:
            os.write(2, f"kat-sandbox: cannot exec {a['python']} as uid {os.getuid()}: {e}\n"
                     .encode())
            os._exit(126)
    os.write(w, str(os.waitpid(user, 0)[1]).encode())
    os._exit(0)
os.close(w)
os.close(alive_r)
status = int(os.read(r, 32) or os.wait()[1])
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
os._exit(os.waitstatus_to_exitcode(status))
""".replace("REFUSED", str(_REFUSED)).replace("UID_BASE", str(UID_BASE))


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot give the isolation its config requires (e.g. no network namespace)."""


@dataclass(frozen=True)
class SandboxResult:
    """What a program did: exit status (negative: killed by that signal), output, timeout, and
    which limit it most likely hit (`violation`)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    violation: str | None = None
    """None, or one of: wall_time, cpu_time, memory, processes, network, filesystem,
    file_size, killed (SIGKILL of unknown origin), setup_timeout (the launcher never got
    ready)."""
    isolation: dict[str, Any] = field(default_factory=dict, compare=False)
    """What the launcher set up: network / pid / readonly_fs (bools), uid, notes."""
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class CodeSandbox(Protocol):
    """Runs a Python program with `stdin` and a wall-clock limit."""

    def run(self, program: str, stdin: str = "", timeout_s: float = 10.0) -> SandboxResult: ...


@dataclass
class SandboxConfig:
    """Limits and isolation of `SubprocessSandbox` (see the module docstring)."""

    python: str = sys.executable
    """Interpreter of the program; must be readable/executable by the sandbox uid."""
    memory_mb: int = 2048
    """Address-space limit (RLIMIT_AS) per process; numpy-style imports need a few hundred MB."""
    max_output_kb: int = 1024
    """stdout/stderr each truncated to this much; also the file-size limit (RLIMIT_FSIZE)."""
    max_processes: int | None = 16
    """RLIMIT_NPROC of the program's uid (its own uid as root); None: no limit."""
    cpu_time_s: int | None = None
    """RLIMIT_CPU in seconds; None: the run's wall-clock limit rounded up, plus 1."""
    namespaces: bool = True
    """Isolate with network, PID and mount namespaces (Linux)."""
    readonly_fs: bool = True
    """Remount everything read-only except the run's directory (needs `namespaces`)."""
    drop_privileges: bool = True
    """As root, run the program under a uid of its own (`sandbox_uid` or a per-run one)."""
    sandbox_uid: int | None = None
    allow_network_fallback: bool = False
    """Run programs even when no network namespace can be made (they then have the network)."""
    setup_timeout_s: float = 60.0
    """Limit on the launcher's setup (namespaces, mounts), which the run's timeout excludes."""

    def __post_init__(self) -> None:
        if self.memory_mb < 32:
            raise ValueError(f"sandbox.memory_mb={self.memory_mb}: expected >= 32")
        if self.max_output_kb < 1:
            raise ValueError(f"sandbox.max_output_kb={self.max_output_kb}: expected >= 1")
        if self.max_processes is not None and self.max_processes < 1:
            raise ValueError(f"sandbox.max_processes={self.max_processes}: expected >= 1")
        if not self.namespaces and not self.allow_network_fallback:
            raise ValueError(
                "sandbox.namespaces=False leaves the program on the network; set "
                "sandbox.allow_network_fallback=True to accept that"
            )
        if self.sandbox_uid is not None and self.sandbox_uid <= 0:
            raise ValueError(f"sandbox.sandbox_uid={self.sandbox_uid}: expected > 0 or None")


_PATTERNS = (
    ("memory", re.compile(r"MemoryError|Cannot allocate memory")),
    ("processes", re.compile(r"BlockingIOError|Resource temporarily unavailable|new thread")),
    ("network", re.compile(r"Errno (101|99|-2|-3|-5)\]|Network is unreachable|resolution")),
    ("filesystem", re.compile(r"Read-only file system|Errno 30\]|PermissionError")),
    ("file_size", re.compile(r"File too large|Errno 27\]")),
)


def diagnose(returncode: int | None, stderr: str, timed_out: bool) -> str | None:
    """Best guess of the limit a run hit, from its exit signal and stderr (None: no failure)."""
    if timed_out:
        return "wall_time"
    if returncode == 0:
        return None
    by_signal = {-signal.SIGXCPU: "cpu_time", -signal.SIGXFSZ: "file_size"}
    if returncode in by_signal:
        return by_signal[returncode]
    for name, pattern in _PATTERNS:
        if pattern.search(stderr):
            return name
    return "killed" if returncode == -signal.SIGKILL else None


def _interpreter_paths(python: str) -> list[str]:
    """Resolved paths the program's interpreter needs (binary, prefix, base prefix)."""
    paths = {os.path.realpath(python), os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        paths |= {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    return sorted(paths)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class SubprocessSandbox:
    """`CodeSandbox` on an isolated local subprocess (see the module docstring)."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()

    def _read(self, f: Any) -> str:
        f.seek(0)
        return f.read(self.config.max_output_kb * 1024).decode("utf-8", errors="replace")

    def run(self, program: str, stdin: str = "", timeout_s: float = 10.0) -> SandboxResult:
        cfg = self.config
        args = {
            "namespaces": cfg.namespaces, "readonly_fs": cfg.readonly_fs and cfg.namespaces,
            "allow_net": cfg.allow_network_fallback, "drop": cfg.drop_privileges,
            "uid": cfg.sandbox_uid, "python": cfg.python, "AS": cfg.memory_mb * 1024 * 1024,
            "CPU": cfg.cpu_time_s or math.ceil(timeout_s) + 1,
            "FSIZE": cfg.max_output_kb * 1024, "NPROC": cfg.max_processes or 0,
            "expose": _interpreter_paths(cfg.python),
        }  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="kat_sandbox_") as tmp:
            os.chmod(tmp, 0o711)  # the program's uid may traverse to its directory, not list
            work = Path(tmp) / "work"
            work.mkdir()
            args["stash"] = str(Path(tmp) / "stash")  # mount points for the launcher's `expose`
            os.mkdir(args["stash"], 0o700)
            Path(args["stash"] + ".file").touch(0o600)
            (work / "main.py").write_text(program, encoding="utf-8")
            env = {"PATH": os.defpath, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
            env.update(PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
            report_r, report_w = os.pipe()
            args["report_fd"] = report_w
            cmd = [sys.executable, "-I", "-c", _LAUNCHER, json.dumps(args)]
            with (
                tempfile.TemporaryFile() as fin,
                tempfile.TemporaryFile() as fout,
                tempfile.TemporaryFile() as ferr,
                os.fdopen(report_r, "rb") as report,
            ):
                fin.write(stdin.encode("utf-8"))
                fin.seek(0)
                try:
                    proc = subprocess.Popen(
                        cmd, cwd=work, env=env, stdin=fin, stdout=fout, stderr=ferr,
                        start_new_session=True, pass_fds=(report_w,),
                    )  # fmt: skip
                finally:
                    os.close(report_w)
                # the wall-clock limit starts once the launcher has set up (namespace creation
                # can stall for seconds on a busy kernel); setup has its own limit
                timed_out, raw, start = False, b"", time.monotonic()
                try:
                    ready = select.select([report], [], [], cfg.setup_timeout_s)[0]
                    raw = report.read() if ready else b""
                    start = time.monotonic()
                    proc.wait(timeout=timeout_s if ready else 0)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc)
                    proc.wait()
                wall = time.monotonic() - start
                isolation = json.loads(raw) if raw else {}
                stdout, stderr = self._read(fout), self._read(ferr)
            if isolation.get("refused") or (not isolation and proc.returncode == _REFUSED):
                raise SandboxUnavailable(
                    "refusing to run code: no network namespace could be created "
                    f"({'; '.join(isolation.get('notes', [])) or stderr.strip()}); set "
                    "sandbox.allow_network_fallback=True to run it with network access"
                )
            code = None if timed_out else proc.returncode
            why = diagnose(code, stderr, timed_out) if raw else "setup_timeout"
            return SandboxResult(code, stdout, stderr, timed_out, why, isolation, wall)
