"""Local multi-rank launches on one machine: `kat train cfg.yaml --nproc 2` re-runs itself here.

`torchrun_command(nproc, target)` is the one place that builds the command line of a local
multi-rank launch: `python -m kat_megatron.launch.ranks` (torchrun's local contract, with the
rendezvous store bound to loopback only and its port picked by the OS, so concurrent jobs never
race for one; `KAT_RDZV_BIND` binds elsewhere) and one OpenMP thread per rank unless
OMP_NUM_THREADS is set. `kat` subcommands (`launch_local`) and the multi-rank tests
(`tests/launcher.py`) use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence


def under_launcher() -> bool:
    """True inside torchrun or an `srun` task that has a rendezvous address."""
    return "RANK" in os.environ or ("SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ)


def torchrun_command(nproc: int, target: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(command, environment) running `target` on `nproc` local ranks: `target` is a script and
    its arguments, or `["-m", MODULE, ...]`."""
    cmd = [sys.executable, "-m", "kat_megatron.launch.ranks", "--nproc-per-node", str(nproc),
           *target]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return cmd, env


def local_torchrun(nproc: int, module_args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(command, environment) running `python -m kat_megatron.cli MODULE_ARGS` on `nproc` ranks."""
    return torchrun_command(nproc, ["-m", "kat_megatron.cli", *module_args])


def launch_local(nproc: int, module_args: Sequence[str]) -> int:
    """Re-run `python -m kat_megatron.cli MODULE_ARGS` on `nproc` local ranks; its exit code."""
    cmd, env = local_torchrun(nproc, module_args)
    return subprocess.call(cmd, env=env)
