"""`kat demo [--out runs/demo] [--quick] [--nproc 2] [--seed S] [--task easy-hard|steps]
[--restart] [--ablation [--seeds 0,1,2]]` (what `make demo` runs, with the default task)."""

from __future__ import annotations

import argparse
import sys
import time


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def run(args: argparse.Namespace) -> int:
    from kat_megatron.demo.pipeline import run_demo
    from kat_megatron.demo.runner import StepFailed

    start = time.perf_counter()
    try:
        report = run_demo(
            args.out, quick=args.quick, nproc=args.nproc, restart=args.restart, seed=args.seed,
            task=args.task,
        )  # fmt: skip
        if args.ablation:
            from kat_megatron.demo.ablation import ablate

            report = ablate(
                args.out, _seeds(args.seeds), quick=args.quick, nproc=args.nproc,
                seed=args.seed, task=args.task,
            )  # fmt: skip
    except ValueError as err:  # a resume with another --seed or --task, bad --seeds
        print(f"demo: {err}", file=sys.stderr)
        return 2
    except StepFailed as err:
        print(f"demo failed: {err}", file=sys.stderr)
        print("fix the cause and rerun the same command: finished steps are skipped",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {report}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole AutoThink pipeline on the tiny default (CPU)",
        description=(
            "Pretrain a tiny teacher, MTP-KD a student, build AutoThink data against the served "
            "teacher, SFT, Step-SRPO, evaluate in three modes, export to Hugging Face and write "
            "OUT/report.md. Every step is a real kat command on --nproc gloo ranks; logs go to "
            "OUT/logs/. A rerun resumes after the last finished step."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (for CI)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per step (default 2: TP=2)")
    p.add_argument("--restart", action="store_true", help="delete OUT and start over")
    p.add_argument("--seed", type=int, default=0,
                   help="one seed for every stage (data, teacher, KD, tagging, synthesis, SFT, RL, "
                        "eval); 0, the default, is what the README measured")  # fmt: skip
    p.add_argument("--task", default="easy-hard", choices=["easy-hard", "steps"],
                   help="synthetic task: easy-hard (default: sums vs products, README's figures) "
                        "or steps (products of 1-5 factors, one template; the mode must be "
                        "learned from the content)")  # fmt: skip
    p.add_argument("--ablation", action="store_true",
                   help="after the demo, train Step-SRPO, GRPO (mode_weight 0) and no RL from its "
                        "SFT checkpoint for each of --seeds; means and 95%% intervals in "
                        "OUT/ablation/ablation.md (not part of make demo)")  # fmt: skip
    p.add_argument("--seeds", default="0,1,2", help="ablation seeds (default 0,1,2)")
    p.set_defaults(func=run)
