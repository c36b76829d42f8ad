"""`kat eval --ckpt DIR --data FILE.jsonl [--mode auto|think_on|think_off|all] [--samples K]
[--temperature T] [--max-new-tokens N] [--out DIR] [--nproc N] [--forced-judge model|prefill]
[--field OURS=THEIRS ...] [--split NAME] [--verifier NAME] [--category NAME]
[--reference-format raw|gsm8k|boxed|json]`.

Accuracy (pass@1, pass@K), output tokens (mean, p50, p90), think-on and format-valid rates per
prompt category and mode; with `--mode all` also auto's token reduction against forced think_on,
the per-prompt oracle router and the frontier (accuracy against mean tokens of think_off,
think_on, oracle and auto; auto's agreement with the oracle; `kat_megatron/eval/report.py`).
Writes OUT/{eval.json, eval.md, samples.jsonl, accuracy.png, tokens.png[, frontier.png]}. See
`kat_megatron/eval/runner.py` for the prompt format and how modes are forced, and
`kat_megatron/eval/datasets.py` (docs/eval_data.md) for standard sets: JSONL, parquet or saved
`datasets` folders, with columns mapped by `--field` and references extracted for a verifier.
"""

from __future__ import annotations

import argparse
import json
import os

from kat_megatron.eval.datasets import REFERENCE_FORMATS
from kat_megatron.eval.runner import EVAL_MODES


def _rank_args(args: argparse.Namespace) -> list[str]:
    """The `kat eval ...` arguments every rank runs with (everything but --nproc)."""
    out = ["eval", "--ckpt", args.ckpt, "--data", args.data, "--mode", args.mode,
           "--samples", str(args.samples), "--temperature", str(args.temperature),
           "--top-p", str(args.top_p), "--max-new-tokens", str(args.max_new_tokens),
           "--out", args.out, "--seed", str(args.seed),
           "--max-batch-size", str(args.max_batch_size),
           "--forced-judge", args.forced_judge,
           "--reference-format", args.reference_format]  # fmt: skip
    for spec in args.field:
        out += ["--field", spec]
    for flag, value in (("--split", args.split), ("--verifier", args.verifier),
                        ("--category", args.category)):  # fmt: skip
        if value is not None:
            out += [flag, value]
    if args.tokenizer:
        out += ["--tokenizer", args.tokenizer]
    if args.no_progress:
        out.append("--no-progress")
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kat_megatron.eval.datasets import EvalDataConfig, parse_fields
    from kat_megatron.eval.runner import EvalConfig, load_prompts
    from kat_megatron.launch.local import launch_local, under_launcher
    from kat_megatron.training.checkpoint_meta import resolve_checkpoint

    modes = EVAL_MODES if args.mode == "all" else (args.mode,)
    # Validate before starting ranks: bad arguments or data fail once, with one message.
    EvalConfig(modes=modes, samples=args.samples, temperature=args.temperature,
               top_p=args.top_p, max_new_tokens=args.max_new_tokens,
               forced_judge=args.forced_judge)  # fmt: skip
    data = EvalDataConfig(args.data, fields=parse_fields(args.field), split=args.split,
                          verifier=args.verifier or "exact_match", category=args.category,
                          reference_format=args.reference_format)  # fmt: skip
    prompts = load_prompts(data)
    ckpt = resolve_checkpoint(args.ckpt)
    if args.nproc > 1 and not under_launcher():
        return launch_local(args.nproc, _rank_args(args))

    import torch.distributed as dist

    from kat_megatron.eval.metrics import frontier, summarize, token_reductions
    from kat_megatron.eval.report import frontier_table, reduction_lines, write_eval_outputs
    from kat_megatron.eval.runner import run_eval, stop_ids
    from kat_megatron.inference.loading import engine_from_checkpoint
    from kat_megatron.parallel.init import shutdown
    from kat_megatron.utils.logging import setup_logging

    setup_logging()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine, tokenizer, _ = engine_from_checkpoint(
        ckpt, tp=world, max_batch_size=args.max_batch_size, tokenizer=args.tokenizer,
        seed=args.seed,
    )  # fmt: skip
    cfg = EvalConfig(
        modes=modes,
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        forced_judge=args.forced_judge,
        chunk_size=args.max_batch_size,
        stop_token_ids=stop_ids(tokenizer),
    )
    try:
        samples = run_eval(engine, prompts, cfg, progress=not args.no_progress)
        if dist.get_rank() == 0:
            summary = summarize(samples, ks=(args.samples,))
            meta = {"ckpt": str(ckpt), "data": str(args.data), "modes": list(modes),
                    "samples": args.samples, "temperature": args.temperature,
                    "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                    "forced_judge": args.forced_judge, "tp": world,
                    "seed": args.seed,
                    "data_options": {"fields": data.fields, "split": args.split,
                                     "verifier": data.verifier, "category": data.category,
                                     "reference_format": data.reference_format}}  # fmt: skip
            files = write_eval_outputs(Path(args.out), summary, samples, meta)
            overall = {m: summary[m]["overall"] for m in summary}
            print(json.dumps({m: {k: round(v, 4) for k, v in o.items()}
                              for m, o in overall.items()}, indent=2))  # fmt: skip
            for line in reduction_lines(token_reductions(summary)):
                print(line)
            front = frontier(samples)
            if front:
                print(frontier_table(front))
            print(f"kat eval: wrote {', '.join(str(p) for p in files.values())}")
    finally:
        shutdown()
    return 0


def register(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="accuracy, tokens and think-on rate of a checkpoint in auto/forced modes",
        description=(
            "Evaluate checkpoint DIR on verifiable prompts (JSONL: id, messages, reference, "
            "verifier, category; or a standard set in JSONL, parquet or a saved datasets "
            "folder, mapped with --field; docs/eval_data.md) in auto mode and/or forced "
            "think_on/think_off; writes eval.json, eval.md, samples.jsonl and PNG plots to --out."
        ),
    )
    e.add_argument(
        "--ckpt", required=True, help="checkpoint: iter_N/, a checkpoints folder or a run dir"
    )
    e.add_argument("--data", required=True,
                   help="prompts: JSONL (synthetic_tasks.prompt_record, or any rows mapped with "
                   "--field), a parquet file or folder of shards, or a datasets.save_to_disk "
                   "folder")  # fmt: skip
    e.add_argument("--field", action="append", default=[], metavar="OURS=THEIRS",
                   help="read our field OURS (id, query, messages, reference, verifier, "
                   "category, entry_point, test_setup) from column THEIRS (a dotted path may "
                   "go into nested columns); repeatable, e.g. --field query=question")  # fmt: skip
    e.add_argument("--split", default=None,
                   help="split of a DatasetDict or of split-named parquet shards (default: "
                   "test if present, else the only one)")  # fmt: skip
    e.add_argument("--verifier", default=None,
                   help="verifier of rows without one (default exact_match); a row's own "
                   "verifier column wins")  # fmt: skip
    e.add_argument("--category", default=None,
                   help="category of rows without one (default: the dataset's file or folder "
                   "name; 'default' for prompt-record JSONL)")  # fmt: skip
    e.add_argument("--reference-format", default="raw", choices=REFERENCE_FORMATS,
                   help="raw (as is; default), gsm8k (after the last ####), boxed (the last "
                   "\\boxed{...}), json (JSON text, as kat data pipelines store it)")  # fmt: skip
    e.add_argument("--mode", default="all", choices=[*EVAL_MODES, "all"],
                   help="auto, think_on, think_off or all three (default: all)")  # fmt: skip
    e.add_argument("--forced-judge", default="model", choices=["model", "prefill"],
                   help="judge text of forced modes: the model's own (generated first; default) "
                   "or the fixed prefill of kat data tag / RL probes")  # fmt: skip
    e.add_argument("--samples", type=int, default=1, help="samples per prompt K (pass@K)")
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    e.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1)")
    e.add_argument("--max-new-tokens", type=int, default=256, help="per answer (default 256)")
    e.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    e.add_argument("--nproc", type=int, default=1, help="local ranks = tensor parallelism")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded at once")
    e.add_argument("--tokenizer", default=None, help="tokenizer (default: the run's)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=run)
