"""The local rank launcher (`kat_megatron.launch.ranks`, what every `--nproc N` runs): its
rendezvous listens on loopback only, a failing rank stops the others, signals reach the ranks.

`pytest tests/launch/test_ranks.py` (real processes and gloo ranks, ~15 s).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from kat_megatron.launch.local import torchrun_command

LISTENERS = textwrap.dedent(
    """
    import json, os, sys, psutil, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)  # gloo's pair sockets are up
    if dist.get_rank() == 0:
        launcher = psutil.Process(os.getppid())
        procs = [launcher, *launcher.children(recursive=True)]
        rows = [(p.pid, c.laddr.ip, c.laddr.port) for p in procs
                for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        json.dump({"sum": t.item(), "listen": rows}, open(sys.argv[1], "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _run(tmp_path: Path, body: str, *args: str, timeout: int = 120):
    script = tmp_path / "worker.py"
    script.write_text(body)
    cmd, env = torchrun_command(2, [str(script), *args])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_job_listens_on_loopback_only(tmp_path):
    """torchrun --standalone hosted its stores on every interface (`*:port`); here every
    listening socket of the launcher and its ranks (store, gloo pairs) is 127.0.0.1."""
    out = tmp_path / "out.json"
    proc = _run(tmp_path, LISTENERS, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["sum"] == 2.0
    assert got["listen"], "no listening socket found: the check would be empty"
    assert {ip for _, ip, _ in got["listen"]} <= {"127.0.0.1", "::1"}, got["listen"]


def test_a_failing_rank_stops_the_others_and_sets_the_exit_code(tmp_path):
    body = textwrap.dedent(
        """
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(3)
        time.sleep(120)
        """
    )
    start = time.monotonic()
    proc = _run(tmp_path, body)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert time.monotonic() - start < 60  # rank 0 was stopped, not waited for
    assert "rank 1 exited with code 3" in proc.stderr


def test_sigterm_reaches_every_rank(tmp_path):
    body = textwrap.dedent(
        """
        import os, signal, sys, time
        from pathlib import Path
        def bye(signum, frame):
            Path(sys.argv[1], os.environ["RANK"]).write_text("stopped")
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        Path(sys.argv[1], "ready" + os.environ["RANK"]).write_text("")
        time.sleep(120)
        """
    )
    (tmp_path / "w.py").write_text(body)
    cmd, env = torchrun_command(2, [str(tmp_path / "w.py"), str(tmp_path)])
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert [(tmp_path / r).read_text() for r in ("0", "1")] == ["stopped", "stopped"]


def test_help_and_bad_arguments():
    run = dict(capture_output=True, text=True, timeout=60)
    proc = subprocess.run([sys.executable, "-m", "kat_megatron.launch.ranks", "--help"], **run)
    assert proc.returncode == 0 and "loopback" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "kat_megatron.launch.ranks", "--nproc-per-node", "0", "x.py"], **run
    )
    assert proc.returncode == 2 and "expected >= 1" in proc.stderr
