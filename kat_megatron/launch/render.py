"""The sbatch script of a run: `kat submit CONFIG.yaml ... --dry-run` prints what this renders.

One batch script per submission, saved as `<run.dir>/slurm/job.sbatch`:
- `#SBATCH` lines: nodes, one task per node, GPUs (or CPUs), time, `--requeue`,
  `--open-mode=append` (a requeued job appends to the same `<run.dir>/slurm/<jobid>.out`) and
  `--signal=B:USR1@<s>` (the warning before the time limit goes to the batch shell only).
- Environment: Megatron-Core's recommendations for NCCL and Transformer Engine on Hopper on GPU
  nodes; thread counts for gloo on CPU nodes; then the user's `--env` overrides.
- Launch: one `srun` task per node running `kat_megatron.launch.torchrun` (torchrun with a
  c10d rendezvous on the allocation's first node, job id as rendezvous id) inside the pyxis
  container or the virtual environment, training from the config snapshot in `<run.dir>/slurm/`.
- Preemption: the batch shell traps SIGUSR1/SIGTERM and touches a notice file that the agents
  forward to their workers; training checkpoints and exits 42 (`EXIT_PREEMPTED`); on 42 the
  script runs `scontrol requeue` (not after SIGTERM: that is how scancel and the time limit end
  a job). Every later start adds `checkpoint.resume=auto`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from kat_megatron.launch.spec import JobSpec

EXIT_PREEMPTED = 42
"""`kat_megatron.training.loop.EXIT_PREEMPTED` (not imported: that pulls in torch; tested equal)."""

# Megatron-Core / Transformer Engine settings for H100/H200 nodes (Megatron-LM's training
# scripts and MoE guide); each is overridable with `--env KEY=VALUE`.
GPU_ENV: tuple[tuple[str, str, str], ...] = (
    ("CUDA_DEVICE_MAX_CONNECTIONS", "1", "keep TP/SP communication ordered with compute"),
    ("NVTE_FWD_LAYERNORM_SM_MARGIN", "16", "leave SMs to overlapped communication"),
    ("NVTE_BWD_LAYERNORM_SM_MARGIN", "16", ""),
    ("TORCH_NCCL_AVOID_RECORD_STREAMS", "1", "free NCCL buffers without record_stream"),
    ("NCCL_NVLS_ENABLE", "0", "NVLink SHARP buffers cost GPU memory"),
    ("NCCL_P2P_NET_CHUNKSIZE", "2097152", "larger pipeline send/recv chunks over IB"),
    ("NCCL_DEBUG", "WARN", ""),
    ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True", "less fragmentation (MoE)"),
)


@dataclass
class LaunchPlan:
    """Everything the script needs besides the JobSpec (resolved by `submission.plan`)."""

    spec: JobSpec
    run_dir: str
    """Absolute run directory (config snapshot, logs, checkpoints)."""
    workdir: str
    """Working directory of training: the batch script's `--chdir`, or with a container the
    container's workdir (the batch script then starts in `<run.dir>/slurm`, a host path)."""
    final_checkpoint: str
    """`kat_meta.json` of the last step's checkpoint: a job finding it has nothing to do."""
    job_name: str
    venv: str | None = None
    """Virtual environment to activate (the resolved `--venv`, or the submitting one)."""
    command_line: str = ""
    """The `kat submit ...` command that rendered the script (a comment in its header)."""

    @property
    def slurm_dir(self) -> str:
        return f"{self.run_dir}/slurm"

    @property
    def config_snapshot(self) -> str:
        return f"{self.slurm_dir}/config.yaml"

    @property
    def script_path(self) -> str:
        return f"{self.slurm_dir}/job.sbatch"

    def log_path(self, job_id: str) -> str:
        return f"{self.slurm_dir}/{job_id}.out"


def _q(text: str) -> str:
    return shlex.quote(str(text))


def sbatch_header(plan: LaunchPlan) -> list[str]:
    """The `#SBATCH` directives."""
    s = plan.spec
    lines = [
        f"--job-name={plan.job_name}",
        f"--nodes={s.nodes}",
        "--ntasks-per-node=1",
    ]
    if s.gpus_per_node:
        lines += [f"--gpus-per-node={s.gpus_per_node}", "--exclusive"]
    if s.cpus_per_node:
        lines.append(f"--cpus-per-task={s.cpus_per_node}")
    if s.partition:
        lines.append(f"--partition={s.partition}")
    if s.account:
        lines.append(f"--account={s.account}")
    lines += [
        f"--time={s.time}",
        f"--chdir={plan.slurm_dir if s.container else plan.workdir}",
        f"--output={plan.slurm_dir}/%j.out",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{s.warning_s}",
    ]
    return [f"#SBATCH {line}" for line in lines]


def environment(plan: LaunchPlan) -> list[str]:
    """`export` lines: defaults for the node kind, then the user's `--env` overrides."""
    s = plan.spec
    out = ["# Environment (override with kat submit --env KEY=VALUE)"]
    out.append(f"export OMP_NUM_THREADS={s.omp_threads}")
    if s.gpus_per_node:
        for key, value, why in GPU_ENV:
            out.append(f"export {key}={_q(value)}" + (f"  # {why}" if why else ""))
    else:
        out.append("# CPU nodes: torch.distributed uses gloo (parallel.dist_backend=auto)")
    out.append("export PYTHONUNBUFFERED=1")
    for item in s.env:
        key, value = item.split("=", 1)
        out.append(f"export {key}={_q(value)}")
    if plan.venv:
        out.append(f"source {_q(plan.venv)}/bin/activate")
    return out


def srun_command(plan: LaunchPlan) -> list[str]:
    """The `srun ... kat_megatron.launch.torchrun ...` command, one argument group per line."""
    s = plan.spec
    first = "srun --ntasks-per-node=1 --kill-on-bad-exit=0"
    if s.cpus_per_node:  # since SLURM 22.05 srun does not inherit sbatch's --cpus-per-task
        first += f" --cpus-per-task={s.cpus_per_node}"
    lines = [first]
    if s.container:
        lines.append(f"--container-image={_q(s.container)}")
        mounts = f"--container-mounts={_q(','.join(s.mounts))} " if s.mounts else ""
        lines.append(f"{mounts}--container-workdir={_q(plan.workdir)}")
    return [
        *lines,
        'python -m kat_megatron.launch.torchrun --notice-file "$NOTICE"',
        f'--nnodes="$SLURM_NNODES" --nproc-per-node={s.nproc_per_node} --max-restarts=0',
        '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"',
        '-m kat_megatron.cli train "$CONFIG" "${EXTRA[@]}" &',
    ]


def _prologue(plan: LaunchPlan) -> list[str]:
    return [
        "set -uo pipefail",
        "",
        f"RUN_DIR={_q(plan.run_dir)}",
        'CONFIG="$RUN_DIR/slurm/config.yaml"  # the resolved config, saved at submission',
        'NOTICE="$RUN_DIR/slurm/preempt.$SLURM_JOB_ID"',
        "RESTART=${SLURM_RESTART_COUNT:-0}",
        'echo "kat: job $SLURM_JOB_ID (restart $RESTART, chain ${KAT_CHAIN_INDEX:-0})" \\',
        '    "on $SLURM_JOB_NODELIST at $(date -u +%FT%TZ)"',
        "",
        f"if [ -f {_q(plan.final_checkpoint)} ]; then",
        '    echo "kat: the run is complete (final checkpoint exists); nothing to do"',
        "    exit 0",
        "fi",
        "EXTRA=()",
        'if [ "$RESTART" -gt 0 ] || [ "${KAT_CHAIN_INDEX:-0}" -gt 0 ]; then',
        "    EXTRA+=(checkpoint.resume=auto)  # a restart or follow-on job continues the run",
        "fi",
    ]


def _preemption() -> list[str]:
    return [
        "# Preemption: the warning signal reaches this shell only; the torchrun agents poll",
        "# $NOTICE and pass it to their workers, which checkpoint and exit 42.",
        "TERMINATED=0",
        "# shellcheck disable=SC2317  # kat_notice runs from the traps",
        "kat_notice() {",
        '    [ "$1" = TERM ] && TERMINATED=1',
        '    echo "kat: SIG$1 at $(date -u +%FT%TZ): training will checkpoint and stop"',
        '    touch "$NOTICE"',
        "}",
        'rm -f "$NOTICE"',
        "trap 'kat_notice USR1' USR1",
        "trap 'kat_notice TERM' TERM",
    ]


def _epilogue(plan: LaunchPlan) -> list[str]:
    code, limit = EXIT_PREEMPTED, plan.spec.max_requeues
    return [
        "SRUN_PID=$!",
        "# `wait` returns early when a trapped signal arrives: wait until srun has really exited.",
        'while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done',
        'wait "$SRUN_PID"; RC=$?',
        'rm -f "$NOTICE"',
        'echo "kat: training exited $RC at $(date -u +%FT%TZ)"',
        f'if [ "$RC" -eq {code} ] && [ "$TERMINATED" -eq 0 ]; then',
        f'    if [ "$RESTART" -ge {limit} ]; then',
        f'        echo "kat: checkpointed, but {limit} restarts reached: not requeueing"',
        f"        exit {code}",
        "    fi",
        '    echo "kat: checkpointed after a preemption notice: requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$RC"',
    ]


def render_script(plan: LaunchPlan) -> str:
    """The whole sbatch script for `plan`, as text ending in a newline."""
    header = [
        "#!/bin/bash",
        f"# {plan.command_line or 'kat submit'}",
        "# Rendered by kat_megatron.launch.render (docs/slurm.md); resubmit rather than edit.",
        *sbatch_header(plan),
    ]
    rendezvous = [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
    ]
    cmd = srun_command(plan)
    launch = [cmd[0] + " \\"] + [f"    {part} \\" for part in cmd[1:-1]] + [f"    {cmd[-1]}"]
    blocks = [
        header,
        _prologue(plan),
        environment(plan),
        rendezvous,
        _preemption(),
        launch + _epilogue(plan),
    ]
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"
