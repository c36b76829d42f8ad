"""Subprocess runners for the tests: `run_ranks` (a script on N local gloo ranks) and `run_logged`.

    run_ranks(["tests/losses/tp_kd_worker.py", str(out_dir)], nproc=2)

runs `python -m kat_megatron.launch.ranks --nproc-per-node 2 tests/losses/tp_kd_worker.py OUT_DIR`
from the repository root: the command line and environment come from
`kat_megatron.launch.local.torchrun_command` (a loopback-only rendezvous on a port the OS picks,
one OpenMP thread per rank), with the repository prepended to PYTHONPATH. A worker script needs no
more to import its sibling modules: Python puts the script's own directory first on sys.path.

Output goes through temporary files, not pipes, so that a stray grandchild holding them open
cannot stall the test after the command itself has ended. A non-zero exit raises AssertionError
with the error lines and the tail of stderr; `check=False` returns the finished process instead.

tests/ is not a package and pytest's importlib mode puts no test directory on sys.path, so tests
reach these through fixtures of tests/conftest.py (`run_ranks`; `kat` for the CLI).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kat_megatron.launch.local import torchrun_command

REPO = Path(__file__).resolve().parents[1]
STDERR_TAIL = 4000
"""Characters of stderr an AssertionError for a failed command carries."""


def run_logged(
    cmd: list[str],
    env: dict[str, str],
    timeout: int,
    check: bool = True,
    cwd: Path = REPO,
    label: str | None = None,
) -> subprocess.CompletedProcess:
    """Run `cmd` with stdout and stderr captured through temporary files; the finished process.

    With `check`, a non-zero exit raises AssertionError naming `label` (default: the command),
    with the lines of stderr that mention an error and the last `STDERR_TAIL` characters.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err, timeout=timeout
        ).returncode
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, code, out.read(), err.read())
    if check and proc.returncode != 0:
        errors = [x for x in proc.stderr.splitlines() if "Error" in x or "error:" in x][:20]
        raise AssertionError(
            f"{label or ' '.join(cmd)} exited {proc.returncode}\n--- error lines ---\n"
            + "\n".join(errors)
            + "\n--- stderr tail ---\n"
            + proc.stderr[-STDERR_TAIL:]
        )
    return proc


def run_ranks(
    target: Sequence[str | Path],
    nproc: int,
    timeout: int = 300,
    env: dict[str, str] | None = None,
    check: bool = True,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess:
    """Run `target` (a script and its arguments, or `["-m", MODULE, ...]`) on `nproc` local gloo
    ranks under torchrun; `env` adds to the launcher's environment. See the module docstring."""
    target = [str(t) for t in target]
    cmd, full_env = torchrun_command(nproc, target)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [full_env.get("PYTHONPATH")])]
    )
    full_env.update(env or {})
    label = f"{' '.join(target)} on {nproc} ranks"
    return run_logged(cmd, full_env, timeout, check=check, cwd=cwd, label=label)
