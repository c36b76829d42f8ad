"""Thin wrappers over SLURM's commands for `kat submit`, `kat jobs` and `kat logs`.

`sbatch` submits (`--parsable`, so the output is the job id); job states come from `squeue`
for queued and running jobs, then `sacct` (clusters with accounting), then `scontrol show job`
(recently finished jobs on clusters without accounting). Every missing command or failed call
is a one-line ValueError naming the command.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

TIMEOUT_S = 60


@dataclass
class JobState:
    """What SLURM says about one job."""

    job_id: str
    state: str
    """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... or UNKNOWN."""
    reason: str = ""
    """Why it is pending (squeue's reason), or the exit code of a finished job."""
    elapsed: str = ""
    restarts: int | None = None
    source: str = ""
    """Which command answered: squeue, sacct or scontrol."""


def require(command: str) -> str:
    """The path of SLURM command `command`; ValueError if it is not on PATH."""
    path = shutil.which(command)
    if path is None:
        raise ValueError(
            f"{command} not found on PATH: this machine has no SLURM client (run kat submit on "
            "a login node, use --dry-run to only print the script, or start a single-node "
            "cluster with scripts/slurm_up.sh)"
        )
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)


def sbatch(script: str, dependency: str | None = None, env: dict[str, str] | None = None) -> str:
    """Submit `script`; returns the job id. `dependency` e.g. `afterany:123`."""
    args = [require("sbatch"), "--parsable"]
    if dependency:
        args.append(f"--dependency={dependency}")
    if env:
        args.append("--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())]))
    proc = _run([*args, script])
    if proc.returncode != 0:
        raise ValueError(f"sbatch {script} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def _squeue(ids: set[str]) -> dict[str, JobState]:
    proc = _run([require("squeue"), "-h", "-o", "%i|%T|%r|%M"])
    if proc.returncode != 0:
        raise ValueError(f"squeue failed: {proc.stderr.strip()}")
    found = {}
    for line in proc.stdout.splitlines():
        job_id, state, reason, elapsed = (line.split("|") + ["", "", "", ""])[:4]
        if job_id in ids:
            reason = "" if reason == "None" else reason
            found[job_id] = JobState(job_id, state, reason, elapsed, source="squeue")
    return found


def _sacct(ids: set[str]) -> dict[str, JobState]:
    if not shutil.which("sacct"):
        return {}
    fmt = "JobIDRaw,State,ExitCode,Elapsed"
    args = ["sacct", "-n", "-P", "-X", "-o", fmt, "-j", ",".join(sorted(ids))]
    proc = _run(args)
    if proc.returncode != 0:  # e.g. "Slurm accounting storage is disabled"
        return {}
    found = {}
    for line in proc.stdout.splitlines():
        job_id, state, code, elapsed = (line.split("|") + ["", "", "", ""])[:4]
        if job_id in ids:
            state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0"
            found[job_id] = JobState(job_id, state, f"exit {code}", elapsed, source="sacct")
    return found


def _scontrol(job_id: str) -> JobState | None:
    proc = _run([require("scontrol"), "show", "job", "-o", job_id])
    if proc.returncode != 0 or "JobState=" not in proc.stdout:
        return None
    fields = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
    restarts = int(fields["Restarts"]) if fields.get("Restarts", "").isdigit() else None
    reason = fields.get("Reason", "")
    reason = "" if reason == "None" else reason
    if fields.get("JobState") not in ("PENDING", "RUNNING"):
        reason = f"exit {fields.get('ExitCode', '?')}"
    return JobState(
        job_id,
        fields.get("JobState", "UNKNOWN"),
        reason,
        fields.get("RunTime", ""),
        restarts,
        source="scontrol",
    )


def job_states(ids: list[str]) -> dict[str, JobState]:
    """State of each job id: squeue, then sacct, then scontrol; UNKNOWN when none knows it."""
    wanted = {str(i) for i in ids}
    if not wanted:
        return {}
    states = _squeue(wanted)
    missing = wanted - states.keys()
    if missing:
        states.update(_sacct(missing))
    for job_id in sorted(wanted - states.keys()):
        found = _scontrol(job_id)
        states[job_id] = found or JobState(job_id, "UNKNOWN", "not known to SLURM any more")
    return states


def job_log_path(job_id: str) -> str | None:
    """StdOut of a job as `scontrol show job` reports it (None when SLURM has forgotten it)."""
    if not shutil.which("scontrol"):
        return None
    proc = _run(["scontrol", "show", "job", "-o", str(job_id)])
    for kv in proc.stdout.split():
        if kv.startswith("StdOut="):
            return kv.split("=", 1)[1]
    return None
