"""`kat kd dump-teacher --ckpt DIR --data PREFIX --num-samples N --topk K --out DIR [--nproc N]`.

Or, taking the samples (data, seed, split, sequence length, steps x global batch), the teacher
checkpoint (`kd.teacher.ckpt`), the output (`kd.teacher.topk_dir`), K and tau from a stage-kd
config: `kat kd dump-teacher --config examples/tiny_kd/config.yaml --topk 64 --nproc 2`.
The library side is `kat_megatron/training/kd_dump.py`; docs/mtp_kd.md explains the format.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kat_megatron.launch.local import launch_local, under_launcher

_SAMPLE_FLAGS = ("data", "num_samples", "seq_length", "seed", "split", "tokenizer", "cache_dir")


def _from_config(args: argparse.Namespace):
    from kat_megatron.stages import load_run_config
    from kat_megatron.training.kd_dump import DumpSpec

    given = [f"--{n.replace('_', '-')}" for n in _SAMPLE_FLAGS if getattr(args, n) is not None]
    if given:
        raise ValueError(f"{' '.join(given)}: with --config the samples come from the config")
    cfg = load_run_config(args.config, args.overrides)
    teacher, t = cfg.kd.teacher_config(), cfg.training
    ckpt, out = args.ckpt or teacher.ckpt, args.out or teacher.topk_dir
    topk = args.topk or cfg.kd.topk or None
    for flag, value, key in (("--ckpt", ckpt, "kd.teacher.ckpt"), ("--out", out, "kd.teacher.topk_dir"),
                             ("--topk", topk, "kd.topk")):  # fmt: skip
        if value is None:
            raise ValueError(f"{flag}: give it, or set {key} in {args.config}")
    return DumpSpec(
        ckpt=ckpt,
        data=cfg.data,
        num_samples=t.steps * t.global_batch_size,
        out=out,
        topk=topk,
        seed=t.seed,
        temperature=args.temperature if args.temperature is not None else cfg.kd.temperature,
        tp=args.tp or 1,
        micro_batch_size=args.micro_batch_size,
        logprob_dtype=args.logprob_dtype,
        precision=cfg.training.precision,
        cache_dir=cfg.data.cache_dir or str(Path(cfg.run.dir) / "data_cache"),
        overwrite=args.overwrite,
        extra={"config": str(args.config)},
    )


def _from_flags(args: argparse.Namespace):
    from kat_megatron.config.schema import DataConfig
    from kat_megatron.training.checkpoint_meta import read_meta
    from kat_megatron.training.kd_dump import DumpSpec

    if args.overrides:
        raise ValueError(f"overrides {args.overrides} need --config")
    for flag in ("ckpt", "data", "num_samples", "topk", "out"):
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag.replace('_', '-')} is required (or pass --config)")
    recorded = read_meta(args.ckpt)["config"].get("data", {})
    data = DataConfig(
        paths=list(args.data),
        tokenizer=args.tokenizer or recorded.get("tokenizer", "tiny"),
        seq_length=args.seq_length or recorded.get("seq_length", 64),
        split=args.split or "98,2,0",
    )
    return DumpSpec(
        ckpt=args.ckpt,
        data=data,
        num_samples=args.num_samples,
        out=args.out,
        topk=args.topk,
        seed=args.seed if args.seed is not None else 1234,
        temperature=args.temperature if args.temperature is not None else 1.0,
        tp=args.tp or 1,
        micro_batch_size=args.micro_batch_size,
        logprob_dtype=args.logprob_dtype,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
    )


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line for the launched ranks (everything but --nproc)."""
    out = ["kd", "dump-teacher"]
    for name, value in vars(args).items():
        if name in ("func", "command", "kd_command", "nproc", "overrides") or value is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
    return [*out, *args.overrides]


def dump(args: argparse.Namespace) -> int:
    spec = _from_config(args) if args.config else _from_flags(args)  # validate before ranks
    if args.nproc > 1 and not under_launcher():
        return launch_local(args.nproc, _argv(args))
    from kat_megatron.parallel.init import shutdown
    from kat_megatron.training.kd_dump import dump_teacher
    from kat_megatron.utils.logging import setup_logging

    setup_logging()
    try:
        dump_teacher(spec)
    finally:
        shutdown()
    return 0


def register(sub) -> None:
    kd = sub.add_parser("kd", help="MTP knowledge distillation tools (stage kd: kat train)")
    kd_sub = kd.add_subparsers(dest="kd_command", required=True)
    d = kd_sub.add_parser(
        "dump-teacher",
        help="write a teacher's top-K log-probs over stage kd's samples",
        description=(
            "Run a teacher checkpoint over the Megatron GPT samples a stage-kd run reads, in the "
            "same order, and write per position its top-K token ids, log-probs at --temperature "
            "and the remaining mass (sharded, memory-mapped; docs/mtp_kd.md). The samples come "
            "from --config (a stage-kd config) or from --data/--num-samples/--seq-length/--seed/"
            "--split, which must equal the KD run's data.paths, training.steps * "
            "training.global_batch_size, data.seq_length, training.seed and data.split."
        ),
    )
    d.add_argument("overrides", nargs="*", help="dotted overrides of --config (key=value)")
    d.add_argument("--config", help="stage-kd config: samples, kd.teacher.ckpt/topk_dir, K, tau")
    d.add_argument("--ckpt", help="teacher checkpoint (iter_* directory or checkpoints root)")
    d.add_argument("--data", nargs="+", help="Megatron .bin/.idx prefix(es) ([w p w p] blends)")
    d.add_argument("--num-samples", type=int, help="training.steps * training.global_batch_size")
    d.add_argument("--seq-length", type=int, help="default: the teacher's data.seq_length")
    d.add_argument("--seed", type=int, help="training.seed of the KD run (default 1234)")
    d.add_argument("--split", help="data.split of the KD run (default 98,2,0)")
    d.add_argument("--tokenizer", help="default: the teacher checkpoint's data.tokenizer")
    d.add_argument("--cache-dir", help="where Megatron's sample indices are cached")
    d.add_argument("--topk", type=int, help="K token ids per position (K = vocab: exact)")
    d.add_argument("--temperature", type=float, help="tau of the log-probs (= kd.temperature)")
    d.add_argument("--out", help="output directory (published atomically)")
    d.add_argument("--tp", type=int, help="tensor-parallel size of the teacher (default 1)")
    d.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward")
    d.add_argument("--logprob-dtype", default="float16", choices=["float16", "float32"])
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    d.add_argument("--nproc", type=int, default=1, help="local ranks (data x tensor parallel)")
    d.set_defaults(func=dump)
