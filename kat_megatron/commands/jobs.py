"""`kat jobs [-n N] [--run-dir DIR]` and `kat logs JOBID [-n LINES] [-f]`.

`kat jobs` lists the jobs `kat submit` recorded (newest last) with SLURM's state (squeue, then
sacct, then scontrol), restarts, and the run's progress from its directory (last logged step,
newest complete checkpoint). `kat logs` prints the tail of a job's output file, which a
requeued job keeps appending to; `-f` follows it until the job leaves the queue.
"""

from __future__ import annotations

import argparse


def jobs(args: argparse.Namespace) -> int:
    from kat_megatron.launch import registry, slurm
    from kat_megatron.launch.status import jobs_table, recent_records

    records = recent_records(args.n, args.run_dir)
    if not records:
        where = args.run_dir or registry.registry_path()
        print(f"no jobs recorded in {where} (kat submit records them)")
        return 0
    states = slurm.job_states([r.job_id for r in records])
    print(jobs_table(records, states))
    return 0


def logs(args: argparse.Namespace) -> int:
    from kat_megatron.launch.status import follow, log_path, tail

    path = log_path(args.job_id)
    if args.follow:
        follow(path, args.job_id)
        return 0
    if not path.exists():
        print(f"{path}: no output yet (the job may still be pending)")
        return 0
    print(tail(path, args.n), end="")
    return 0


def register(sub) -> None:
    j = sub.add_parser(
        "jobs",
        help="status of the jobs kat submit recorded",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " "),
    )
    j.add_argument("-n", type=int, default=20, help="newest N jobs (0 = all), default 20")
    j.add_argument("--run-dir", help="only the jobs of this run directory")
    j.set_defaults(func=jobs)
    lg = sub.add_parser("logs", help="tail of a submitted job's output")
    lg.add_argument("job_id", help="SLURM job id (kat jobs lists them)")
    lg.add_argument("-n", type=int, default=50, help="last N lines, default 50")
    lg.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    lg.set_defaults(func=logs)
