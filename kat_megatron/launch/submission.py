"""Plan and submit a run: `kat submit CONFIG.yaml [key=value ...] --nodes N --time HH:MM:SS`.

`plan_launch` loads and validates the config for the requested ranks and resolves the paths
(run directory, checkpoints, working directory, environment); `submit` writes the config
snapshot and the sbatch script into `<run.dir>/slurm/`, submits the job (and `--chain` follow-on
jobs, each `afterany` the previous), and records them in the job registry.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kat_megatron.config import KatConfig, dump_config
from kat_megatron.launch import registry, slurm
from kat_megatron.launch.render import LaunchPlan, render_script
from kat_megatron.launch.spec import JobSpec, check_fits
from kat_megatron.stages import load_run_config
from kat_megatron.training.checkpoint_meta import META_FILE, checkpoint_dir


def checkpoint_root(cfg: KatConfig) -> str:
    """Where the run's checkpoints go (`checkpoint.dir`, or `<run.dir>/checkpoints`)."""
    return cfg.checkpoint.dir or f"{cfg.run.dir}/checkpoints"


def final_checkpoint_meta(cfg: KatConfig) -> str:
    """`kat_meta.json` of the checkpoint of the run's last step (as training names it)."""
    return str(checkpoint_dir(checkpoint_root(cfg), cfg.training.steps) / META_FILE)


def _absolute(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def default_venv(spec: JobSpec) -> str | None:
    """`--venv`, else the submitting interpreter's virtual environment (none with a container)."""
    if spec.container:
        return None
    if spec.venv:
        return os.path.abspath(os.path.expanduser(spec.venv))
    return sys.prefix if sys.prefix != sys.base_prefix else None


def plan_launch(
    config: str,
    overrides: list[str],
    spec: JobSpec,
    workdir: str | None = None,
    command_line: str = "",
) -> tuple[KatConfig, LaunchPlan]:
    """Validate `config` + `overrides` for `spec` and resolve everything the script needs.

    Relative `run.dir` and `checkpoint.dir` are made absolute against `workdir` (default: the
    current directory), which is also the job's working directory.
    """
    cfg = load_run_config(config, overrides)  # a bad stage fails here, not after the job starts
    check_fits(cfg, spec)
    workdir = os.path.abspath(os.path.expanduser(workdir or os.getcwd()))
    cfg.run.dir = _absolute(cfg.run.dir, workdir)
    if cfg.checkpoint.dir:
        cfg.checkpoint.dir = _absolute(cfg.checkpoint.dir, workdir)
    plan = LaunchPlan(
        spec=spec,
        run_dir=cfg.run.dir,
        workdir=workdir,
        final_checkpoint=final_checkpoint_meta(cfg),
        job_name=spec.job_name or f"kat-{cfg.run.name}",
        venv=default_venv(spec),
        command_line=command_line,
    )
    return cfg, plan


@dataclass
class Submitted:
    """What `submit` did: the job ids (first, then follow-ons) and where things are."""

    job_ids: list[str]
    records: list[registry.JobRecord]
    plan: LaunchPlan


def submit(cfg: KatConfig, plan: LaunchPlan, config: str) -> Submitted:
    """Write the snapshot and script, submit the job and its chain, record them."""
    slurm.require("sbatch")
    Path(plan.slurm_dir).mkdir(parents=True, exist_ok=True)
    dump_config(cfg, plan.config_snapshot)
    Path(plan.script_path).write_text(render_script(plan))
    os.chmod(plan.script_path, 0o755)
    job_ids: list[str] = []
    records = []
    for index in range(plan.spec.chain + 1):
        depends = f"afterany:{job_ids[-1]}" if job_ids else None
        env = {"KAT_CHAIN_INDEX": str(index)} if index else None
        job_id = slurm.sbatch(plan.script_path, dependency=depends, env=env)
        job_ids.append(job_id)
        record = registry.JobRecord(
            job_id=job_id,
            name=plan.job_name,
            run_dir=plan.run_dir,
            script=plan.script_path,
            log=plan.log_path(job_id),
            checkpoints=checkpoint_root(cfg),
            config=os.path.abspath(config),
            nodes=plan.spec.nodes,
            ranks=plan.spec.world_size,
            submitted_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            chain_index=index,
            depends_on=job_ids[-2] if index else None,
        )
        registry.add(record)
        records.append(record)
    return Submitted(job_ids, records, plan)
