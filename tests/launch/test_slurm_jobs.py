"""`kat submit` on a real single-node SLURM: `pytest tests/launch/test_slurm_jobs.py`.

Two jobs of the tiny CPU pretraining config (TP=2 on two gloo ranks, 20 steps) are submitted
together and run side by side:
- `straight` runs uninterrupted: it completes, and its log, script, config snapshot and
  checkpoints are where `kat submit` said; `kat jobs` and `kat logs` report it; its `--chain 1`
  follow-on job starts after it and finds nothing left to do.
- `preempted` is sent SIGUSR1 through its batch shell (`scancel --signal=USR1 --batch`, what
  `#SBATCH --signal=B:USR1@...` does before the time limit) a few steps in: it checkpoints,
  exits 42, requeues itself, resumes from that checkpoint in the same job, run directory and
  (offline) wandb run, and completes. Its losses and final weights and optimizer state equal the
  straight run's bitwise: CPU fp32 with a fixed layout is deterministic, so any difference is
  lost state (RNG, scheduler, data position) across the requeue.
Needs SLURM (started from `scripts/slurm_up.sh` when root; skipped with the reason otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kat_megatron.launch import slurm

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
SIGNAL_AT_STEP = 3
OVERRIDES = [f"training.steps={STEPS}", "checkpoint.save_interval=10", "logging.interval=1"]
ALLOC = ["--nodes", "1", "--gpus-per-node", "0", "--ranks-per-node", "2", "--cpus-per-node", "1",
         "--time", "00:15:00"]  # fmt: skip
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED", "UNKNOWN"}  # fmt: skip


@dataclass
class Job:
    job_id: str
    run_dir: Path
    paths: dict[str, Path]
    """What `kat submit` printed: run dir, script, config, log, checkpoints."""
    follow_on: list[str] = field(default_factory=list)
    """Job ids of `--chain` follow-on jobs."""
    preempt: dict = field(default_factory=dict)


def kat(args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kat_megatron.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kat {' '.join(args)}: {proc.stderr[-3000:]}"
    return proc


def submit(run_dir: Path, extra: list[str], partition: str, env: dict) -> Job:
    out = kat(
        ["submit", "examples/tiny_pretrain/config.yaml", f"run.dir={run_dir}", *OVERRIDES,
         *extra, *ALLOC, "--partition", partition],
        env,
    ).stdout  # fmt: skip
    first = out.splitlines()[0]
    assert first.startswith("submitted job "), out
    job = Job(first.split()[2], run_dir, {})
    for line in out.splitlines()[1:]:
        key, sep, value = line.strip().partition(": ")
        if sep and key in ("run dir", "script", "config", "log", "checkpoints"):
            job.paths[key] = Path(value.strip())
        if line.startswith("submitted follow-on job "):
            job.follow_on.append(line.split()[3])
    return job


def wait_for(job: Job, timeout_s: float) -> slurm.JobState:
    """Poll SLURM until the job has ended for good (a requeued job is pending, not ended)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = slurm.job_states([job.job_id])[job.job_id]
        if state.state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job.job_id} still {state.state} after {timeout_s} s")
        time.sleep(2)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def preempt_when_training(job: Job, timeout_s: float = 400) -> None:
    """Signal the batch shell once the job has logged SIGNAL_AT_STEP steps (a thread)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = logged_steps(job.run_dir)
        if steps >= SIGNAL_AT_STEP:
            cmd = ["scancel", "--signal=USR1", "--batch", job.job_id]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            job.preempt.update(step=steps, rc=proc.returncode, err=proc.stderr)
            return
        if slurm.job_states([job.job_id])[job.job_id].state in TERMINAL:
            break
        time.sleep(0.2)
    job.preempt.update(step=None, err="the job ended (or never trained) before the signal")


@pytest.fixture(scope="module")
def jobs(slurm_partition, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_jobs")
    env = dict(
        os.environ,
        KAT_HOME=str(root / "kat_home"),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
    )
    straight = submit(root / "straight", ["--chain", "1"], slurm_partition, env)
    preempted = submit(root / "preempted", ["logging.wandb=true"], slurm_partition, env)
    signaller = threading.Thread(target=preempt_when_training, args=(preempted,), daemon=True)
    signaller.start()
    yield {"straight": straight, "preempted": preempted, "signaller": signaller, "env": env}
    for job_id in (straight.job_id, *straight.follow_on, preempted.job_id):
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)  # leave none behind


def log_text(job: Job) -> str:
    path = job.paths["log"]
    return path.read_text(errors="replace") if path.exists() else f"<no log at {path}>"


@pytest.mark.timeout(900)
def test_submitted_tiny_run_completes(jobs):
    job = jobs["straight"]
    state = wait_for(job, timeout_s=600)
    assert state.state == "COMPLETED", f"{state}\n{log_text(job)[-4000:]}"
    p = job.paths
    assert p["run dir"] == job.run_dir and p["log"] == job.run_dir / "slurm" / f"{job.job_id}.out"
    assert p["script"].is_file() and p["config"].is_file()
    assert "kat: training exited 0" in log_text(job)
    ckpts = p["checkpoints"]
    for step in (10, STEPS):
        assert (ckpts / f"iter_{step:07d}" / "kat_meta.json").is_file(), sorted(ckpts.iterdir())
    assert logged_steps(job.run_dir) == STEPS
    table = kat(["jobs"], jobs["env"]).stdout
    row = next(line for line in table.splitlines() if line.startswith(job.job_id + " "))
    assert "COMPLETED" in row and str(p["log"]) in row, table
    assert "kat: training exited 0" in kat(["logs", job.job_id, "-n", "5"], jobs["env"]).stdout
    followed = kat(["logs", job.job_id, "--follow"], jobs["env"]).stdout  # ended: prints, returns
    assert followed == p["log"].read_text(errors="replace")
    # --chain 1: the follow-on job starts after this one and finds the run complete
    (follow_on,) = job.follow_on
    chained = Job(follow_on, job.run_dir, {"log": job.run_dir / "slurm" / f"{follow_on}.out"})
    state = wait_for(chained, timeout_s=300)
    assert state.state == "COMPLETED", f"{state}\n{log_text(chained)}"
    assert f"kat: job {follow_on} (restart 0, chain 1)" in log_text(chained)
    assert "the run is complete (final checkpoint exists); nothing to do" in log_text(chained)


def assert_same_state(a: Path, b: Path) -> None:
    """Model weights and optimizer state of two checkpoints are bitwise equal (as test_resume)."""
    from kat_megatron.training.checkpointing import read_checkpoint_tensors

    ta, tb = read_checkpoint_tensors(a), read_checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    assert any(k.startswith("decoder.") for k in ta) and any(k.startswith("optimizer.") for k in ta)
    for key in ta:
        assert ta[key].equal(tb[key]), key


@pytest.mark.timeout(900)
def test_preempted_job_requeues_and_resumes_bitwise(jobs, metrics):
    job, straight = jobs["preempted"], jobs["straight"]
    jobs["signaller"].join(timeout=600)
    assert job.preempt.get("step") and job.preempt["rc"] == 0, job.preempt
    state = wait_for(job, timeout_s=900)
    log = log_text(job)
    assert state.state == "COMPLETED", f"{state}\n{log[-4000:]}"
    assert "kat: SIGUSR1" in log and "requeueing job" in log, log[-4000:]
    assert f"kat: job {job.job_id} (restart 1, chain 0)" in log
    resumed = [ln for ln in log.splitlines() if "resumed from" in ln]
    assert len(resumed) == 1, log[-4000:]
    step = int(resumed[0].rsplit("(step ", 1)[1].rstrip(")"))
    assert job.preempt["step"] <= step < STEPS  # saved mid-run, after the signal
    ckpts = job.paths["checkpoints"]
    assert (ckpts / f"iter_{step:07d}" / "kat_meta.json").is_file()
    if state.restarts is not None:  # scontrol reports it; sacct/squeue do not
        assert state.restarts == 1
    # the same run as the uninterrupted job: every step's loss, and the final state, bitwise
    wait_for(straight, timeout_s=600)
    rows, ref = metrics(job.run_dir), metrics(straight.run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    final = f"iter_{STEPS:07d}"
    assert_same_state(straight.paths["checkpoints"] / final, ckpts / final)
    # one logging run across the requeue: the offline wandb run id is reused
    run_id = (job.run_dir / "wandb_id.txt").read_text().strip()
    offline = sorted((job.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)
    table = kat(["jobs", "--run-dir", str(job.run_dir)], jobs["env"]).stdout
    assert "COMPLETED" in table and f" {STEPS} " in table, table
