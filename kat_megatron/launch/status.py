"""What `kat jobs` and `kat logs JOBID` show: SLURM's state joined with the run directory.

A job's row combines its registry record, SLURM's state (`slurm.job_states`) and the run's own
progress: the newest complete checkpoint and the last step in `metrics.jsonl`.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from kat_megatron.launch import registry, slurm
from kat_megatron.launch.registry import JobRecord
from kat_megatron.training.checkpoint_meta import complete_checkpoints

ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED")


@dataclass
class RunProgress:
    """How far a run got, read from its directory."""

    last_step: int | None = None
    """The last step written to metrics.jsonl."""
    checkpoint_step: int | None = None
    """The step of the newest complete checkpoint."""


def run_progress(record: JobRecord) -> RunProgress:
    """Last logged step and newest complete checkpoint of the record's run."""
    progress = RunProgress()
    metrics = Path(record.run_dir) / "metrics.jsonl"
    if metrics.exists():
        for line in reversed(metrics.read_text(encoding="utf-8").splitlines()):
            try:
                progress.last_step = int(json.loads(line)["step"])
                break
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    found = complete_checkpoints(record.checkpoints)
    progress.checkpoint_step = found[-1][0] if found else None
    return progress


def jobs_table(records: list[JobRecord], states: dict[str, slurm.JobState]) -> str:
    """The `kat jobs` table: one row per job, newest last."""
    header = ("JOBID", "NAME", "STATE", "RESTARTS", "STEP", "CKPT", "NODES", "LOG")
    rows = [header]
    for r in records:
        st = states.get(r.job_id) or slurm.JobState(r.job_id, "UNKNOWN")
        state = st.state + (f" ({st.reason})" if st.reason else "")
        progress = run_progress(r)
        rows.append(
            (
                r.job_id,
                r.name,
                state,
                "-" if st.restarts is None else str(st.restarts),
                "-" if progress.last_step is None else str(progress.last_step),
                "-" if progress.checkpoint_step is None else str(progress.checkpoint_step),
                str(r.nodes),
                r.log,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]
        for row in rows
    )


def recent_records(limit: int, run_dir: str | None = None) -> list[JobRecord]:
    """The newest `limit` registry records (of one run directory when `run_dir` is given)."""
    if run_dir:
        records = registry.read(Path(run_dir) / "slurm" / "jobs.jsonl")
    else:
        records = registry.read()
    return records[-limit:] if limit else records


def log_path(job_id: str) -> Path:
    """The job's output file: from the registry, else from `scontrol show job`."""
    record = registry.find(job_id)
    if record is not None:
        return Path(record.log)
    path = slurm.job_log_path(job_id)
    if path is None:
        raise ValueError(
            f"job {job_id}: not in the kat job registry ({registry.registry_path()}) and not "
            "known to SLURM; kat jobs lists the jobs kat submit recorded"
        )
    return Path(path)


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of `path` ('' if it does not exist yet)."""
    if not path.exists():
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


def _print_from(path: Path, pos: int, out) -> int:
    if not path.exists():
        return pos
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(pos)
        out.write(f.read())
        out.flush()
        return f.tell()


def follow(path: Path, job_id: str, poll_s: float = 2.0, out=None) -> None:
    """Print `path` as it grows until the job has left the queue (`kat logs -f`)."""
    out = out or sys.stdout
    pos = 0
    while True:
        done = slurm.job_states([job_id])[job_id].state not in ACTIVE
        pos = _print_from(path, pos, out)
        if done:
            return
        time.sleep(poll_s)
