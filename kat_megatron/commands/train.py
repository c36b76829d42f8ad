"""`kat train CONFIG.yaml [key=value ...] [--nproc N] [--resume auto|none|DIR]`."""

from __future__ import annotations

import argparse

from kat_megatron.launch.local import launch_local, under_launcher


def run(args: argparse.Namespace) -> int:
    from kat_megatron.models.builder import resolve_backend
    from kat_megatron.stages import load_run_config
    from kat_megatron.utils.logging import setup_logging

    if args.resume is not None:
        args.overrides = [*args.overrides, f"checkpoint.resume={args.resume}"]
    # Validate before starting ranks: a bad key, stage or backend fails once, early.
    cfg = load_run_config(args.config, args.overrides)
    resolve_backend(cfg.model)
    if args.nproc > 1 and not under_launcher():
        return launch_local(args.nproc, ["train", args.config, *args.overrides])

    from kat_megatron.parallel.init import shutdown
    from kat_megatron.stages import build_trainer

    setup_logging()
    try:
        build_trainer(cfg).run()
    finally:
        shutdown()
    return 0


def register(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description=(
            "Train from CONFIG.yaml. Overrides are dotted keys, e.g. optimizer.lr=3e-4 "
            "parallel.tp=2. With --nproc N, starts N local ranks through torchrun; under "
            "torchrun or SLURM it joins the ranks it finds. Writes config.yaml, metrics.jsonl "
            "and checkpoints/ into run.dir; checkpoint.resume=auto (default) resumes."
        ),
    )
    t.add_argument("config", help="YAML config (see examples/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    t.add_argument("--nproc", type=int, default=1, help="local ranks to start (default 1)")
    t.add_argument(
        "--resume",
        default=None,
        metavar="auto|none|DIR",
        help="auto: newest complete checkpoint of the run (the default); none: start fresh; "
        "DIR: that checkpoint (same as checkpoint.resume=...)",
    )
    t.set_defaults(func=run)
