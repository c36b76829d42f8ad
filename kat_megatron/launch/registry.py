"""The registry of submitted jobs that `kat jobs` and `kat logs JOBID` read.

One JSON object per line in `$KAT_HOME/jobs.jsonl` (default `~/.kat/jobs.jsonl`), appended by
`kat submit` for every job it submits (a chain adds one line per job). Each run directory also
keeps its own copy in `<run.dir>/slurm/jobs.jsonl`, so a run's jobs can be found from the run
alone. Appends of single short lines are atomic on local filesystems; readers skip lines they
cannot parse.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class JobRecord:
    """One submitted job."""

    job_id: str
    name: str
    run_dir: str
    script: str
    log: str
    """The job's output file (`<run.dir>/slurm/<job_id>.out`), appended across requeues."""
    checkpoints: str
    config: str
    """The config file given to `kat submit`."""
    nodes: int
    ranks: int
    submitted_at: str
    chain_index: int = 0
    """0 for the first job; i for the i-th follow-on job of `--chain`."""
    depends_on: str | None = None


def registry_path() -> Path:
    """`$KAT_HOME/jobs.jsonl`, `~/.kat/jobs.jsonl` by default."""
    home = os.environ.get("KAT_HOME") or os.path.join(os.path.expanduser("~"), ".kat")
    return Path(home) / "jobs.jsonl"


def _append(path: Path, record: JobRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(dataclasses.asdict(record), sort_keys=True) + "\n")


def add(record: JobRecord) -> None:
    """Record a submitted job in the user's registry and in its run directory."""
    _append(registry_path(), record)
    _append(Path(record.run_dir) / "slurm" / "jobs.jsonl", record)


def read(path: Path | None = None) -> list[JobRecord]:
    """All records of a registry file, oldest first (missing file: none)."""
    path = path or registry_path()
    if not path.exists():
        return []
    names = {f.name for f in dataclasses.fields(JobRecord)}
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            raw = json.loads(line)
            records.append(JobRecord(**{k: v for k, v in raw.items() if k in names}))
        except (json.JSONDecodeError, TypeError):
            continue
    return records


def find(job_id: str) -> JobRecord | None:
    """The newest record of `job_id`, or None."""
    for record in reversed(read()):
        if record.job_id == str(job_id):
            return record
    return None
