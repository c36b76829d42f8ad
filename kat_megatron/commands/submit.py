"""`kat submit CONFIG.yaml [key=value ...] --nodes N --gpus-per-node G --time HH:MM:SS [...]`.

Renders the run's sbatch script (docs/slurm.md), saves it with the resolved config under
`<run.dir>/slurm/`, submits it (plus `--chain K` follow-on jobs) and prints the job id(s).
`--dry-run` only prints the script. `--gpus-per-node 0` runs CPU ranks (gloo), as many per node
as `--ranks-per-node`.
"""

from __future__ import annotations

import argparse
import shlex

from kat_megatron.launch.spec import JobSpec

_OPTIONS = (
    "nodes",
    "gpus_per_node",
    "ranks_per_node",
    "cpus_per_node",
    "partition",
    "account",
    "time",
    "container",
    "venv",
    "chain",
    "warn_seconds",
    "max_requeues",
    "job_name",
)
_DEFAULTS = {"chain": 0, "max_requeues": 20}


def job_spec(args: argparse.Namespace) -> JobSpec:
    """The JobSpec of the parsed arguments (validated by JobSpec itself)."""
    mounts = [m for item in args.mounts or [] for m in item.split(",") if m]
    return JobSpec(
        **{name: getattr(args, name) for name in _OPTIONS},
        mounts=mounts,
        env=list(args.env or []),
    )


def command_line(args: argparse.Namespace) -> str:
    """The submission as one canonical `kat submit ...` line (the script's header comment)."""
    parts = ["kat", "submit", args.config, *args.overrides]
    for name in _OPTIONS:
        value = getattr(args, name)
        if value is not None and value != _DEFAULTS.get(name):
            parts += ["--" + name.replace("_", "-"), str(value)]
    for flag, values in (("--mounts", args.mounts), ("--env", args.env)):
        for value in values or []:
            parts += [flag, value]
    if args.workdir:
        parts += ["--workdir", args.workdir]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from kat_megatron.launch.render import render_script
    from kat_megatron.launch.submission import plan_launch, submit

    spec = job_spec(args)
    cfg, plan = plan_launch(args.config, args.overrides, spec, args.workdir, command_line(args))
    if args.dry_run:
        print(render_script(plan), end="")
        return 0
    done = submit(cfg, plan, args.config)
    if args.parsable:
        print("\n".join(done.job_ids))
        return 0
    first = done.records[0]
    print(f"submitted job {done.job_ids[0]} ({spec.nodes} nodes, {spec.world_size} ranks)")
    for record in done.records[1:]:
        print(f"submitted follow-on job {record.job_id} (after {record.depends_on})")
    print(f"  run dir:     {plan.run_dir}")
    print(f"  script:      {plan.script_path}")
    print(f"  config:      {plan.config_snapshot}")
    print(f"  log:         {first.log}")
    print(f"  checkpoints: {first.checkpoints}")
    print(f"status: kat jobs; log: kat logs {done.job_ids[0]}")
    return 0


def _add_allocation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("allocation")
    g.add_argument("--nodes", type=int, required=True, help="nodes (one torchrun per node)")
    g.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs per node; 0 = CPU nodes (gloo)"
    )
    g.add_argument(
        "--ranks-per-node", type=int, help="ranks per node (default: GPUs, or 1 on CPU nodes)"
    )
    g.add_argument("--cpus-per-node", type=int, help="CPUs for each node's task (--cpus-per-task)")
    g.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--time", required=True, help="time limit HH:MM:SS or D-HH:MM:SS")


def _add_environment(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("software environment")
    env = g.add_mutually_exclusive_group()
    env.add_argument("--container", metavar="IMAGE", help="pyxis/enroot image (see container/)")
    env.add_argument(
        "--venv", metavar="PATH", help="virtualenv to activate (default: the current one)"
    )
    g.add_argument(
        "--mounts",
        action="append",
        metavar="SRC:DST[,...]",
        help="container mounts (repeatable, comma-separated)",
    )
    g.add_argument("--env", action="append", metavar="KEY=VALUE", help="extra export (repeatable)")
    g.add_argument("--workdir", help="job working directory (default: the current directory)")


def register(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a training run to SLURM",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " "),
    )
    p.add_argument("config", help="YAML config (see examples/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    _add_allocation(p)
    _add_environment(p)
    g = p.add_argument_group("preemption and chaining")
    g.add_argument("--chain", type=int, default=0, help="follow-on jobs (afterany), default 0")
    g.add_argument(
        "--warn-seconds",
        type=int,
        help="SIGUSR1 this long before the time limit (default min(300, limit/4))",
    )
    g.add_argument(
        "--max-requeues",
        type=int,
        default=_DEFAULTS["max_requeues"],
        help="stop requeueing after this many restarts",
    )
    g.add_argument("--job-name", help="SLURM job name (default kat-<run.name>)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script only")
    p.add_argument("--parsable", action="store_true", help="print only the job id(s)")
    p.set_defaults(func=run)
