"""Run untrusted Python programs: the `CodeSandbox` interface and a subprocess implementation.

`python -c "from kat_megatron.verifiers.sandbox import SubprocessSandbox; print(
SubprocessSandbox().run('print(1 + 1)'))"`

`SubprocessSandbox` is a first line of defence, not isolation: each program runs in a fresh
temporary directory, as `python -I -B` (no user site, no PYTHON* variables) with a minimal
environment, in its own session (the whole process group is killed on timeout), under rlimits
set by a small launcher before `exec`: address space, CPU seconds, file size (stdout/stderr go
to files, so the file-size limit also caps output), no core dumps, optionally process count.
It does not block network or file-system reads; the RL issue replaces it with a hardened
sandbox behind the same `CodeSandbox.run` interface.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_LAUNCHER = """\
import os, resource, sys
mem, cpu, fsize, nproc = (int(x) for x in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if nproc > 0:
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
os.execv(sys.executable, [sys.executable, "-I", "-B", sys.argv[5]])
"""


@dataclass(frozen=True)
class SandboxResult:
    """What a program did: exit status (negative: killed by that signal), output, timeout."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class CodeSandbox(Protocol):
    """Runs a Python program with `stdin` and a wall-clock limit."""

    def run(self, program: str, stdin: str = "", timeout_s: float = 10.0) -> SandboxResult: ...


@dataclass
class SandboxConfig:
    """Limits of `SubprocessSandbox`."""

    python: str = sys.executable
    memory_mb: int = 2048
    """Address-space limit (RLIMIT_AS); numpy-style imports need a few hundred MB."""
    max_output_kb: int = 1024
    """stdout/stderr each truncated to this much; also the file-size limit (RLIMIT_FSIZE)."""
    max_processes: int | None = None
    """RLIMIT_NPROC (counts all of the user's processes, so leave None on shared hosts)."""

    def __post_init__(self) -> None:
        if self.memory_mb < 32:
            raise ValueError(f"sandbox.memory_mb={self.memory_mb}: expected >= 32")
        if self.max_output_kb < 1:
            raise ValueError(f"sandbox.max_output_kb={self.max_output_kb}: expected >= 1")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class SubprocessSandbox:
    """`CodeSandbox` on a local subprocess with rlimits (see the module docstring)."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()

    def _read(self, path: Path) -> str:
        with open(path, "rb") as f:
            data = f.read(self.config.max_output_kb * 1024)
        return data.decode("utf-8", errors="replace")

    def run(self, program: str, stdin: str = "", timeout_s: float = 10.0) -> SandboxResult:
        cfg = self.config
        limits = [
            cfg.memory_mb * 1024 * 1024,
            math.ceil(timeout_s) + 1,
            cfg.max_output_kb * 1024,
            cfg.max_processes or 0,
        ]
        with tempfile.TemporaryDirectory(prefix="kat_sandbox_") as tmp:
            work = Path(tmp)
            (work / "main.py").write_text(program, encoding="utf-8")
            (work / "stdin").write_text(stdin, encoding="utf-8")
            env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
            env.update(PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
            cmd = [cfg.python, "-I", "-c", _LAUNCHER, *map(str, limits), "main.py"]
            with (
                open(work / "stdin", "rb") as fin,
                open(work / "stdout", "wb") as fout,
                open(work / "stderr", "wb") as ferr,
            ):
                proc = subprocess.Popen(
                    cmd, cwd=tmp, env=env, stdin=fin, stdout=fout, stderr=ferr,
                    start_new_session=True,
                )  # fmt: skip
                timed_out = False
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc)
                    proc.wait()
            return SandboxResult(
                None if timed_out else proc.returncode,
                self._read(work / "stdout"),
                self._read(work / "stderr"),
                timed_out,
            )
