"""Fixtures for the SLURM tests: a real single-node cluster and a private job registry.

`slurm_partition` (session): the default partition of a working SLURM. When none answers and
the tests run as root, it starts one with `scripts/slurm_up.sh` (Debian packages, see
docs/slurm.md); otherwise, or when that fails, the SLURM tests skip and say why (a warning in
the summary, visible under `pytest -q` too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_UP = REPO / "scripts" / "slurm_up.sh"


def _default_partition() -> str | None:
    """The default partition if `sinfo` answers with a usable node, else None."""
    if not shutil.which("sinfo"):
        return None
    proc = subprocess.run(
        ["sinfo", "-h", "-o", "%P|%t"], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        name, _, state = line.partition("|")
        if name.endswith("*") and state.strip() in ("idle", "mix", "alloc", "comp"):
            return name[:-1]
    return None


def _start_slurm() -> str | None:
    """Why SLURM cannot be had here (None once it runs)."""
    if _default_partition() is not None:
        return None
    if os.geteuid() != 0:
        return "SLURM is not running and starting it needs root (sudo scripts/slurm_up.sh)"
    proc = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return f"scripts/slurm_up.sh exited {proc.returncode}: {tail}"
    if _default_partition() is None:
        return "scripts/slurm_up.sh succeeded but sinfo shows no usable default partition"
    return None


class SlurmUnavailable(RuntimeWarning):
    """Shown in the warnings summary (pyproject filters UserWarning) when SLURM tests skip."""


@pytest.fixture(scope="session")
def slurm_partition() -> str:
    """Name of the default partition of a running SLURM (started here when possible)."""
    reason = _start_slurm()
    if reason is not None:
        warnings.warn(SlurmUnavailable(f"SLURM tests skipped: {reason}"), stacklevel=1)
        pytest.skip(reason)
    return _default_partition()


@pytest.fixture
def kat_home(tmp_path, monkeypatch) -> Path:
    """A private job registry (KAT_HOME) for this test and the processes it starts."""
    home = tmp_path / "kat_home"
    monkeypatch.setenv("KAT_HOME", str(home))
    return home
