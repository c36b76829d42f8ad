"""The per-node launcher `python -m kat_megatron.launch.torchrun`, run for real (2 local workers).

`pytest tests/launch/test_torchrun.py`. A toy worker stands in for training: it takes a while to
install its SIGUSR1 handler (as training does while importing), starts a helper process without
a handler (as the checkpoint writer's multiprocessing manager), waits for the notice and exits
42. Checked: a notice given before the workers are ready still reaches every worker, the helper
is not signalled, and the launcher's exit code is the workers' 42 (plain torchrun says 1). The
agent's own SIGUSR1 handler path and the exit-code rule are checked on stand-ins.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kat_megatron.launch.torchrun import exit_code, split_args

WORKER = """
import os, signal, subprocess, sys, time
out = sys.argv[1]
rank = os.environ["RANK"]
time.sleep(1.5)  # "importing": no handler yet, a signal now would kill this process
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(os.path.join(out, f"ready{rank}"), "w").close()
start = time.time()
while not got and time.time() - start < 60:
    time.sleep(0.05)
alive = helper.poll() is None
helper.kill()
open(os.path.join(out, f"result{rank}"), "w").write(f"{bool(got)} {alive}")
# As training does (the ranks agree on stopping, then save together), exit only once every
# rank has its answer: a rank exiting first makes torchrun stop the others.
open(os.path.join(out, f"done{rank}"), "w").close()
while not all(os.path.exists(os.path.join(out, f"done{r}")) for r in ("0", "1")):
    if time.time() - start > 60:
        break
    time.sleep(0.05)
sys.exit(42 if got else 0)
"""


def launch(tmp_path: Path, notice: Path | None) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = ["--notice-file", str(notice)] if notice else []
    cmd = [
        sys.executable, "-m", "kat_megatron.launch.torchrun", *args,
        "--standalone", "--nproc-per-node=2", "--max-restarts=0",
        str(script), str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: int = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace")


def results(tmp_path: Path) -> list[str]:
    return [(tmp_path / f"result{r}").read_text() for r in (0, 1)]


def test_notice_file_before_workers_are_ready(tmp_path):
    notice = tmp_path / "preempt.notice"
    proc = launch(tmp_path, notice)
    notice.touch()  # the batch shell's trap, before the workers handle SIGUSR1
    code, out = finish(proc)
    assert code == 42, out[-3000:]
    assert results(tmp_path) == ["True True", "True True"], out[-3000:]  # helpers untouched
    assert out.count("preemption notice -> worker") == 2


def test_sigusr1_to_the_agent_waits_for_the_workers_handler(monkeypatch):
    """The agent's own SIGUSR1 handler path, on one real child standing in for a worker."""
    from kat_megatron.launch import torchrun

    child = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys, time\n"
        "time.sleep(1.0)\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(42))\n"
        "time.sleep(60)\n"
    )])  # fmt: skip
    monkeypatch.setattr(torchrun, "worker_pids", lambda: [child.pid])
    forwarder = torchrun.NoticeForwarder(None)
    forwarder.request(signal.SIGUSR1, None)  # what the agent's handler does
    forwarder.poll()
    assert forwarder.signalled == set() and child.poll() is None  # no handler yet: not sent
    deadline = time.time() + 30
    while not forwarder.signalled and time.time() < deadline:
        time.sleep(0.1)
        forwarder.poll()
    assert child.wait(timeout=30) == 42


def _child_failed(*codes: int):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {i: ProcessFailure(i, 1000 + i, code, "") for i, code in enumerate(codes)}
    return ChildFailedError("kat_megatron.cli", failures)


@pytest.mark.parametrize(
    "codes, expected",
    [
        ((42, 42), 42),
        ((42, -signal.SIGTERM), 42),  # the agent tore rank 1 down after rank 0 exited 42
        ((-signal.SIGKILL, 42), 42),
        ((42, 1), 1),  # a real failure beside the preemption: do not requeue
        ((3,), 3),
        ((-signal.SIGSEGV,), 128 + signal.SIGSEGV),
    ],
)
def test_exit_code_of_worker_failures(codes, expected):
    assert exit_code(_child_failed(*codes)) == expected


@pytest.mark.parametrize(
    "argv, notice, rest",
    [
        (["--notice-file", "/x", "--nnodes=2"], "/x", ["--nnodes=2"]),
        (["--notice-file=/y", "-m", "m"], "/y", ["-m", "m"]),
        (["--nnodes=2", "-m", "m"], None, ["--nnodes=2", "-m", "m"]),
    ],
)
def test_split_args(argv, notice, rest):
    path, remaining = split_args(argv)
    assert (str(path) if path else None, remaining) == (notice, rest)


def test_exit_code_of_other_errors():
    from torch.distributed.elastic.multiprocessing.api import SignalException

    assert exit_code(SignalException("term", signal.SIGTERM)) == 128 + signal.SIGTERM
    assert exit_code(RuntimeError("rendezvous timed out")) == 1
