"""The `kat` command: `kat train CONFIG.yaml [key=value ...] [--nproc N]`, `kat model info NAME`.

Subcommands are thin: parse, build, run. `kat <command> --help` explains each one.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _under_launcher() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ


def cmd_train(args: argparse.Namespace) -> int:
    from kat_megatron.config import load_config
    from kat_megatron.models.builder import resolve_backend
    from kat_megatron.utils.logging import setup_logging

    if args.resume is not None:
        args.overrides = [*args.overrides, f"checkpoint.resume={args.resume}"]
    # Validate before starting ranks: a bad key or an impossible backend fails once, early.
    cfg = load_config(args.config, args.overrides)
    resolve_backend(cfg.model)
    if cfg.stage != "pretrain":
        raise ValueError(f"{args.config}: stage {cfg.stage!r} is not available yet (pretrain is)")
    if args.nproc > 1 and not _under_launcher():
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc-per-node", str(args.nproc),
            "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()),
            "-m", "kat_megatron.cli", "train", args.config, *args.overrides,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return subprocess.call(cmd, env=env)

    from kat_megatron.parallel.init import shutdown
    from kat_megatron.training.loop import Trainer

    setup_logging()
    try:
        Trainer(cfg).run()
    finally:
        shutdown()
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from kat_megatron.models.info import model_info

    print(model_info(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kat", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

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
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("model", help="model utilities")
    msub = m.add_subparsers(dest="model_command", required=True)
    info = msub.add_parser(
        "info", help="total and active parameters per component of a preset or config"
    )
    info.add_argument(
        "name",
        help="preset name (kat-v1-40b, kat-200b-a40b, tiny-dense, tiny-moe) or a config.yaml",
    )
    info.set_defaults(func=cmd_model_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`kat train cfg.yaml --nproc 2 optimizer.lr=1e-3`).
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kat: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
