"""Running the demo's steps: `kat` subprocesses with logs, one status line per step, resumable.

Each step's output goes to `OUT/logs/NN_step.log`; the console shows kat's rank-0 INFO lines and
warnings as they come, so progress stays visible without Megatron-Core's noise. A step that
finishes writes `OUT/.done/STEP` (with its wall time); a rerun skips finished steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kat_megatron.utils.io import atomic_write_text

_SHOW = re.compile(r"(INFO rank0\]|WARNING|ERROR|Error|error:|Traceback)")
_BAR = re.compile(r"^(.*?)\s*(\d+)%\|")
"""A tqdm progress line: shown at each quarter (0, 25, 50, 75, 100 %)."""


class StepFailed(RuntimeError):
    """A demo step's command failed; the message names the step, the command and its log."""


class Runner:
    """Runs the demo's numbered steps under `out`; `Runner(out).step(name, fn)`."""

    def __init__(self, out: Path, total: int, echo: Callable[[str], None] = print) -> None:
        self.out = Path(out)
        self.total = total
        self.index = 0
        self.echo = echo
        self.times: dict[str, float] = {}
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        (self.out / ".done").mkdir(parents=True, exist_ok=True)
        self._log: Path | None = None

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run step `name` (its function calls `self.kat(...)`), unless a rerun finds it done."""
        self.index += 1
        done = self.out / ".done" / name
        head = f"[{self.index}/{self.total}] {name}"
        if done.exists():
            self.times[name] = json.loads(done.read_text())["seconds"]
            self.echo(f"{head}: done earlier ({self.times[name]:.0f} s), skipped")
            return
        self._log = self.out / "logs" / f"{self.index:02d}_{name}.log"
        self._log.write_text("")
        self.echo(f"{head}: started (log: {self._log})")
        start = time.perf_counter()
        fn()
        self.times[name] = time.perf_counter() - start
        atomic_write_text(done, json.dumps({"seconds": self.times[name]}))
        self.echo(f"{head}: finished in {self.times[name]:.0f} s")

    def kat(self, *args: str, nproc: int = 1, check: bool = True) -> int:
        """Run `kat ARGS [--nproc N]` to completion, streaming its log; raise StepFailed."""
        cmd = [sys.executable, "-m", "kat_megatron.cli", *args]
        if nproc > 1:
            cmd += ["--nproc", str(nproc)]
        with self.background(cmd) as proc:
            rc = proc.wait()
        if check and rc != 0:
            raise StepFailed(self._failure(cmd, rc))
        return rc

    def _failure(self, cmd: list[str], rc: int) -> str:
        tail = self._log.read_text(errors="replace").splitlines()[-30:] if self._log else []
        return f"command exited with {rc}: {' '.join(cmd[2:])}\nlog: {self._log}\n" + "\n".join(
            tail
        )

    @contextlib.contextmanager
    def background(self, cmd: list[str]) -> Iterator[subprocess.Popen]:
        """Start `cmd` writing to this step's log; echo the interesting lines; stop it on exit."""
        assert self._log is not None, "background() outside a step"
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env.setdefault("WANDB_MODE", "offline")
        with open(self._log, "a") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        stop = threading.Event()
        start_at = self._log.stat().st_size  # earlier commands of this step are already shown
        tail = threading.Thread(target=self._follow, args=(self._log, start_at, stop), daemon=True)
        tail.start()
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # kat serve forwards it to its ranks
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            stop.set()
            tail.join(timeout=5)

    def _follow(self, path: Path, start_at: int, stop: threading.Event) -> None:
        with open(path, errors="replace") as f:
            f.seek(start_at)
            buf = ""
            shown: dict[str, int] = {}
            while True:
                chunk = f.read()
                if chunk:
                    buf += chunk.replace("\r", "\n")
                    *lines, buf = buf.split("\n")
                    for line in lines:
                        bar = _BAR.search(line)
                        if bar:
                            quarter = int(bar.group(2)) // 25
                            if shown.get(bar.group(1), -1) < quarter:
                                shown[bar.group(1)] = quarter
                                self.echo("    " + line.strip()[:160])
                        elif _SHOW.search(line):
                            self.echo("    " + line.strip()[:160])
                elif stop.is_set():
                    return
                else:
                    time.sleep(0.2)

    @contextlib.contextmanager
    def serve(self, ckpt: Path, nproc: int, timeout_s: float = 300) -> Iterator[str]:
        """`kat serve` on a free loopback port for the block; yields its base URL (.../v1). The
        port is 0 (the OS picks one when the server binds, after loading the model): a port
        chosen earlier could be taken meanwhile; the ready file names the real one."""
        ready = self.out / "logs" / f"serve_{os.getpid()}.ready"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "kat_megatron.cli", "serve", "--ckpt", str(ckpt),
            "--port", "0", "--ready-file", str(ready), "--nproc", str(nproc),
            "--reasoning-parser", "autothink", "--model-name", "teacher,default",
        ]  # fmt: skip  # the names examples/demo/*.yaml and the pipelines' default ask for
        with self.background(cmd) as proc:
            deadline = time.monotonic() + timeout_s
            while not ready.exists():
                if proc.poll() is not None:
                    raise StepFailed(self._failure(cmd, proc.returncode))
                if time.monotonic() > deadline:
                    raise StepFailed(f"kat serve not ready after {timeout_s} s; log: {self._log}")
                time.sleep(0.5)
            url = ready.read_text().strip()
            self.echo(f"    kat serve ready at {url}")
            yield url
