"""Run untrusted Python programs: the `CodeSandbox` interface and a subprocess implementation.

`python -c "from kat_megatron.verifiers.sandbox import SubprocessSandbox; print(
SubprocessSandbox().run('print(1 + 1)'))"`

`SubprocessSandbox.run` starts a launcher (`sandbox_launcher.py`: `python -I`, own session,
minimal environment) that isolates the program, then `exec`s `python -I -B main.py` in it.
docs/sandbox.md has the full table of what is contained and what is not; in short:
- network, PID, IPC and UTS namespaces: no connection leaves the run (host loopback and
  abstract unix sockets included); everything the program started dies with it. Without a
  network namespace the sandbox refuses (`SandboxUnavailable`) unless `allow_network_fallback`;
- a minimal root (`readonly_fs`): a tmpfs holding read-only, nosuid bind mounts of only the
  interpreter's prefixes and the system libraries, /dev/null & co., its own /proc, and the run's
  directory /sandbox, a tmpfs of `disk_mb` MiB and `max_files` inodes (also /tmp and /dev/shm).
  No host file, no other run, no host unix socket is reachable;
- its own uid as root (UID_BASE + launcher pid), else nested user namespaces; no new privileges
  (PR_SET_NO_NEW_PRIVS, nosuid mounts);
- rlimits: address space (`memory_mb`), CPU seconds, file size (`max_output_kb`, which caps
  stdout/stderr too: `SandboxResult.truncated`), processes (`max_processes`), no core dumps.
`SandboxResult.error` reports a failure of the sandbox itself (never raised, except
`SandboxUnavailable`); `violation` names the limit a failed run most likely hit.

`run_pair` runs two programs in two such sandboxes connected only by pipes (fd 3 reads what the
other writes on its fd 4): the code verifier judges a program from a second, trusted process.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

UID_BASE = 1_500_000_000
"""Per-run uids (root only) are UID_BASE + the launcher's pid; no account needs to exist."""
LIBRARY_PATHS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32")
"""System library directories bound read-only into the minimal root (those that exist)."""
_REFUSED = 97
_LAUNCHER = Path(__file__).with_name("sandbox_launcher.py").read_text()
_KILL_GRACE_S = 0.5


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot give the isolation its config requires (e.g. no network namespace)."""


@dataclass(frozen=True)
class SandboxResult:
    """What a program did: exit status (negative: killed by that signal), output, timeout, and
    which limit it most likely hit (`violation`); `error` when the sandbox itself failed."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    violation: str | None = None
    """None, or one of: wall_time, cpu_time, memory, processes, network, filesystem,
    file_size, disk, files, killed (SIGKILL of unknown origin), setup_timeout (the launcher
    never got ready)."""
    isolation: dict[str, Any] = field(default_factory=dict, compare=False)
    """What the launcher set up: network / pid / readonly_fs / root / no_new_privs (bools),
    uid, notes; after the run disk_free_kb and files_free of the run's directory."""
    wall_s: float = 0.0
    truncated: bool = False
    """stdout or stderr was longer than `max_output_kb` (then cut there)."""
    error: str | None = None
    """Why the sandbox could not run the program (an internal failure, not the program's):
    the other fields then say nothing about the program."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.error is None


class CodeSandbox(Protocol):
    """Runs a Python program with `stdin` and a wall-clock limit."""

    def run(self, program: str, stdin: str = "", timeout_s: float = 10.0) -> SandboxResult: ...


class PairedSandbox(CodeSandbox, Protocol):
    """A `CodeSandbox` that can also run a program next to a peer, linked only by two pipes."""

    def run_pair(
        self, program: str, peer: str, timeout_s: float = 10.0, peer_timeout_s: float = 10.0
    ) -> tuple[SandboxResult, SandboxResult]: ...


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
    """Isolate with network, PID, mount, IPC and UTS namespaces (Linux)."""
    readonly_fs: bool = True
    """Give the program the minimal root (needs `namespaces`); False: the host's file system,
    writable wherever its uid may write (for debugging only)."""
    disk_mb: int = 64
    """Size of the run's directory (a tmpfs): everything the program writes, together."""
    max_files: int = 2048
    """Inodes of the run's directory: files and directories the program may create."""
    library_paths: tuple[str, ...] = LIBRARY_PATHS
    """System library directories in the minimal root (bound read-only where they exist)."""
    ro_paths: tuple[str, ...] = ()
    """Further host paths to show read-only (nosuid, nodev) at the same place in the root."""
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
        if self.disk_mb < 1 or self.max_files < 16:
            raise ValueError(
                f"sandbox.disk_mb={self.disk_mb} / max_files={self.max_files}: expected >= 1 / 16"
            )
        if not self.namespaces and not self.allow_network_fallback:
            raise ValueError(
                "sandbox.namespaces=False leaves the program on the network; set "
                "sandbox.allow_network_fallback=True to accept that"
            )
        if self.sandbox_uid is not None and self.sandbox_uid <= 0:
            raise ValueError(f"sandbox.sandbox_uid={self.sandbox_uid}: expected > 0 or None")
        if not all(os.path.isabs(p) for p in (*self.library_paths, *self.ro_paths)):
            raise ValueError("sandbox.library_paths / ro_paths: expected absolute paths")


_PATTERNS = (
    ("memory", re.compile(r"MemoryError|Cannot allocate memory")),
    ("processes", re.compile(r"BlockingIOError|Resource temporarily unavailable|new thread")),
    ("network", re.compile(r"Errno (101|99|-2|-3|-5)\]|Network is unreachable|resolution")),
    ("disk", re.compile(r"No space left on device|Errno 28\]")),
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
    """Paths the program's interpreter needs: the binary as named, its prefix, and (for this
    interpreter) the venv and base prefixes."""
    real = os.path.realpath(python)
    paths = {os.path.abspath(python), os.path.dirname(os.path.dirname(real))}
    if real == os.path.realpath(sys.executable):
        paths |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return sorted(paths - {"/"})  # an interpreter directly under / would expose the host's /


def _read_report(fd: int, timeout_s: float) -> tuple[dict, bool]:
    """The next JSON line of the launcher's report pipe ({} if none) and whether it timed out."""
    buf, deadline = b"", time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return {}, True
        chunk = os.read(fd, 1)  # bytewise: the second line must stay in the pipe
        if not chunk:
            break
        buf += chunk
    return (json.loads(buf) if buf.strip() else {}), False


class _Launch:
    """One started launcher with its temporary files; `finish` waits and builds the result."""

    def __init__(self, cfg: SandboxConfig, timeout_s: float) -> None:
        self.cfg, self.timeout_s = cfg, timeout_s
        self.proc: subprocess.Popen | None = None
        self.report: int | None = None
        self.files: list[Any] = []
        self.tmp = os.path.realpath(tempfile.mkdtemp(prefix="kat_sandbox_"))

    def start(self, program: str, stdin: str, channel: tuple[int, ...] = ()) -> None:
        cfg = self.cfg
        self.files = [tempfile.TemporaryFile() for _ in range(3)]  # stdin, stdout, stderr
        os.chmod(self.tmp, 0o711)  # without a root, the program's uid traverses to `work`
        work = Path(self.tmp) / "work"
        work.mkdir(0o700)
        os.mkdir(Path(self.tmp) / "root", 0o700)  # mount point of the minimal root
        (work / "main.py").write_bytes(program.encode("utf-8", "surrogatepass"))
        self.files[0].write(stdin.encode("utf-8", "surrogatepass"))
        self.files[0].seek(0)
        self.report, report_w = os.pipe()
        args = {
            "namespaces": cfg.namespaces, "readonly_fs": cfg.readonly_fs and cfg.namespaces,
            "allow_net": cfg.allow_network_fallback, "drop": cfg.drop_privileges,
            "uid": cfg.sandbox_uid, "uid_base": UID_BASE, "refused_code": _REFUSED,
            "python": cfg.python, "AS": cfg.memory_mb * 1024 * 1024,
            "CPU": cfg.cpu_time_s or math.ceil(self.timeout_s) + 1,
            "FSIZE": cfg.max_output_kb * 1024 + 1, "NPROC": cfg.max_processes or 0,
            "binds": _interpreter_paths(cfg.python) + list(cfg.library_paths + cfg.ro_paths),
            "disk_kb": cfg.disk_mb * 1024, "max_files": cfg.max_files,
            "work": str(work), "root_dir": os.path.join(self.tmp, "root"),
            "report_fd": report_w, "channel_fds": list(channel),
        }  # fmt: skip
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _LAUNCHER, json.dumps(args)], cwd=work,
                env={"PATH": os.defpath, "LANG": "C.UTF-8"}, stdin=self.files[0],
                stdout=self.files[1], stderr=self.files[2], start_new_session=True,
                pass_fds=(report_w, *channel),
            )  # fmt: skip
        finally:
            os.close(report_w)

    def _wait(self, stop: threading.Event | None) -> bool:
        """Wait up to the run's limit (or until `stop`, plus a grace); True if it timed out."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                self.proc.wait(timeout=max(0.0, min(left, 0.05) if stop else left))
                return False
            except subprocess.TimeoutExpired:
                if left <= 0:
                    return True
                if stop is not None and stop.is_set():
                    deadline = min(deadline, time.monotonic() + _KILL_GRACE_S)
                    stop = None

    def _output(self, f: Any) -> tuple[str, bool]:
        limit = self.cfg.max_output_kb * 1024
        f.seek(0)
        data = f.read(limit + 1)
        return data[:limit].decode("utf-8", errors="replace"), len(data) > limit

    def finish(self, stop: threading.Event | None = None) -> SandboxResult:
        cfg = self.cfg
        # the wall-clock limit starts once the launcher has set up (namespace creation can
        # stall for seconds on a busy kernel); setup has its own limit
        iso, setup_timed_out = _read_report(self.report, cfg.setup_timeout_s)
        setup, start, timed_out = bool(iso), time.monotonic(), False
        try:
            timed_out = self._wait(stop) if setup else False
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        wall = time.monotonic() - start
        after = _read_report(self.report, 2.0)[0] if setup else {}
        (stdout, cut_out), (stderr, cut_err) = (
            self._output(self.files[1]),
            self._output(self.files[2]),
        )
        if iso.get("refused") or (not iso and self.proc.returncode == _REFUSED):
            raise SandboxUnavailable(
                "refusing to run code: no network namespace could be created "
                f"({'; '.join(iso.get('notes', [])) or stderr.strip()}); set "
                "sandbox.allow_network_fallback=True to run it with network access"
            )
        iso.update({k: v for k, v in after.items() if k != "status"})
        error = iso.pop("error", None)
        if not setup and not setup_timed_out:
            code = self.proc.returncode
            error = f"sandbox launcher exited with {code} before setup: {stderr.strip()[-300:]}"
        elif not setup:
            error = f"sandbox setup did not finish within {cfg.setup_timeout_s:g} s"
            return SandboxResult(
                None, stdout, stderr, False, "setup_timeout", iso, wall, error=error
            )
        if error:
            return SandboxResult(None, stdout, stderr, False, None, iso, wall, error=error)
        code = None if timed_out else self.proc.returncode
        why = diagnose(code, stderr, timed_out)
        if code not in (0, None) and why in (None, "disk", "killed"):
            if after.get("files_free") == 0:
                why = "files"
            elif after.get("disk_free_kb", 1 << 30) <= 4:
                why = "disk"
        return SandboxResult(code, stdout, stderr, timed_out, why, iso, wall, cut_out or cut_err)

    def close(self) -> None:
        """Kill what is left, close the files, remove the host directory (never raises)."""
        try:
            if self.proc is not None and self.proc.returncode is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self.proc.wait()
            for f in self.files:
                f.close()
            if self.report is not None:
                os.close(self.report)
                self.report = None
        except Exception:
            pass
        try:
            shutil.rmtree(self.tmp)
        except Exception:  # e.g. a tree too deep for rmtree (a run without the minimal root)
            try:
                subprocess.run(["rm", "-rf", "--one-file-system", self.tmp], check=False)
            except OSError:
                pass


def _internal(e: BaseException) -> SandboxResult:
    return SandboxResult(None, "", "", error=f"sandbox: {type(e).__name__}: {e}")


class SubprocessSandbox:
    """`PairedSandbox` on isolated local subprocesses (see the module docstring)."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()

    def run(self, program: str, stdin: str = "", timeout_s: float = 10.0) -> SandboxResult:
        launch = None
        try:
            launch = _Launch(self.config, timeout_s)
            launch.start(program, stdin)
            return launch.finish()
        except SandboxUnavailable:
            raise
        except Exception as e:  # an internal failure is a result, never an exception
            return _internal(e)
        finally:
            if launch is not None:
                launch.close()

    def run_pair(
        self, program: str, peer: str, timeout_s: float = 10.0, peer_timeout_s: float = 10.0
    ) -> tuple[SandboxResult, SandboxResult]:
        """Run `program` and `peer` in two sandboxes; in each, fd 3 reads what the other writes
        on its fd 4. Nothing else links them. `program` is killed once `peer` has ended."""
        launches: list[_Launch] = []
        results: list[SandboxResult | None] = [None, None]
        done = threading.Event()
        a_r, a_w = os.pipe()  # program -> peer
        b_r, b_w = os.pipe()  # peer -> program
        try:
            try:
                for text, limit, fds in ((program, timeout_s, (b_r, a_w)),
                                         (peer, peer_timeout_s, (a_r, b_w))):  # fmt: skip
                    launches.append(_Launch(self.config, limit))
                    launches[-1].start(text, "", fds)
            finally:
                for fd in (a_r, a_w, b_r, b_w):
                    os.close(fd)

            def wait_peer() -> None:
                try:
                    results[1] = launches[1].finish()
                except Exception as e:
                    results[1] = _internal(e)
                finally:
                    done.set()

            waiter = threading.Thread(target=wait_peer, daemon=True)
            waiter.start()
            try:
                results[0] = launches[0].finish(stop=done)
            finally:
                waiter.join()
            return results[0], results[1]  # type: ignore[return-value]
        except SandboxUnavailable:
            raise
        except Exception as e:
            return results[0] or _internal(e), results[1] or _internal(e)
        finally:
            for launch in launches:
                launch.close()
