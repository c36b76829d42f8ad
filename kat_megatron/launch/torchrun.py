"""`python -m kat_megatron.launch.torchrun [--notice-file F] TORCHRUN_ARGS`: torchrun for SLURM.

What `kat submit`'s batch script starts once per node (one srun task per node). It is
`torch.distributed.run` (same arguments, same rendezvous, same workers) with two changes that a
preemptible job needs:

- Preemption notices reach the training workers and nothing else. The agent forwards SIGUSR1 to
  its own worker processes instead of dying (torchrun has no SIGUSR1 handler) or tearing them
  down (`--signals-to-handle` would). The batch script does not signal the job step (that
  reaches every process in it, including the checkpoint writer's multiprocessing manager, which
  dies on SIGUSR1); it touches `--notice-file`, which this agent polls and forwards the same way.
  A worker is signalled only once it handles SIGUSR1 (one still importing would be killed).
- The exit code is the first failing worker's: torchrun exits 1 for any worker failure, which
  would hide `EXIT_PREEMPTED` (42), the code that makes the batch script requeue the job.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from kat_megatron.launch.render import EXIT_PREEMPTED

POLL_S = 0.5


def worker_pids() -> list[int]:
    """PIDs of this process's direct children (torchrun's workers)."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=False)]


def catches(pid: int, signum: int) -> bool:
    """True if process `pid` has a handler for `signum` (Linux /proc SigCgt; True elsewhere)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone (False), or no /proc on this system (True: just send)
        return not Path("/proc/self/status").exists()
    mask = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), "0")
    return bool(int(mask, 16) >> (signum - 1) & 1)


class NoticeForwarder:
    """Forwards one preemption notice (SIGUSR1 to the agent, or `notice_file` appearing) to
    each worker as SIGUSR1, once the worker handles it: a worker still importing would die."""

    def __init__(self, notice_file: Path | None, poll_s: float = POLL_S) -> None:
        self.notice_file = notice_file
        self.poll_s = poll_s
        self.requested = threading.Event()
        self.signalled: set[int] = set()

    def request(self, signum=None, frame=None) -> None:
        """Signal handler: ask for the notice to be forwarded."""
        self.requested.set()

    def poll(self) -> None:
        """One check: note the notice file; signal every ready worker not yet signalled."""
        if self.notice_file is not None and self.notice_file.exists():
            self.requested.set()
        if not self.requested.is_set():
            return
        for pid in worker_pids():
            if pid in self.signalled or not catches(pid, signal.SIGUSR1):
                continue
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                continue
            self.signalled.add(pid)
            print(f"kat.launch.torchrun: preemption notice -> worker {pid}", file=sys.stderr)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_s):
            self.poll()


def split_args(argv: list[str]) -> tuple[Path | None, list[str]]:
    """(`--notice-file` path or None, the remaining torchrun arguments)."""
    if len(argv) >= 2 and argv[0] == "--notice-file":
        return Path(argv[1]), argv[2:]
    if argv and argv[0].startswith("--notice-file="):
        return Path(argv[0].split("=", 1)[1]), argv[1:]
    return None, argv


def exit_code(err: BaseException) -> int:
    """The exit code for a torchrun failure: the workers' own, not torchrun's blanket 1.

    42 (`EXIT_PREEMPTED`) when every worker that exited with a code exited 42 (workers the agent
    killed while tearing down after the first exit count as consequences, not causes); else the
    first other positive code; else 128 + the signal that killed the first worker.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(err, ChildFailedError):
        failures = sorted(err.failures.values(), key=lambda f: f.timestamp)
        positive = [f.exitcode for f in failures if f.exitcode > 0]
        if positive and all(code == EXIT_PREEMPTED for code in positive):
            return EXIT_PREEMPTED
        others = [code for code in positive if code != EXIT_PREEMPTED]
        return others[0] if others else 128 + abs(failures[0].exitcode)
    if isinstance(err, SignalException):
        return 128 + int(err.sigval)
    return 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import parse_args, run

    notice, torchrun_args = split_args(list(sys.argv[1:] if argv is None else argv))
    forwarder = NoticeForwarder(notice)
    signal.signal(signal.SIGUSR1, forwarder.request)
    stop = threading.Event()
    threading.Thread(target=forwarder.run, args=(stop,), daemon=True).start()
    try:
        run(parse_args(torchrun_args))
        return 0
    except Exception as err:  # ChildFailedError, SignalException, rendezvous errors
        code = exit_code(err)
        print(f"kat.launch.torchrun: exiting {code}: {err}", file=sys.stderr)
        return code
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main())
