"""`kat demo --ablation [--out runs/demo] [--seeds 0,1,2]`: Step-SRPO against GRPO and no RL,
from the same SFT checkpoint, over several seeds, with means and 95% intervals.

Needs a finished `kat demo` in OUT (its `student_sft` checkpoint, `data/prompts.jsonl` and
`data/eval.jsonl`; the same `--quick`, `--task` and `--nproc`). Arms:
  step_srpo  stage rl with `examples/demo/student_rl.yaml` as the demo trains it
  grpo       the same with `rl.advantages.mode_weight=0` (GRPO: `rl/advantages.py`)
  no_rl      the SFT checkpoint itself
For every seed S, the RL arms train with `training.seed = base + 1000 * S` and every arm is
evaluated (`kat eval --mode all`) with eval seed `1000 * S` (the no_rl arm's spread is the eval
sampling's alone: zero when eval decodes greedily; for S = the demo's --seed, the demo's
`eval/student_sft` is that very evaluation and is copied, not rerun). Runs go to
`OUT/ablation/ARM_sS/`, evals to `OUT/ablation/eval/ARM_sS/`; every run is a resumable step
(`OUT/ablation/.done/`).

Reported (`OUT/ablation/ablation.json`, `ablation.md`), per arm and category (and overall):
auto accuracy, auto mean output tokens, auto think-on rate and auto's agreement with the
per-prompt oracle router (`eval/metrics.py: frontier`), each as the mean over seeds and a 95%
interval mean +- t(0.975, n-1) * sd / sqrt(n) (Student's t; n = number of seeds; with one
seed no interval). Differences step_srpo - grpo are paired by seed (same SFT start and eval
seed) and get their own interval. Whatever the numbers are is what the file says.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path

from kat_megatron.demo.pipeline import (
    EXAMPLES,
    FULL,
    QUICK,
    SEED_STRIDE,
    Demo,
    config_seed,
    latest,
)
from kat_megatron.demo.runner import Runner
from kat_megatron.utils.io import atomic_write_text

ARMS = ("step_srpo", "grpo", "no_rl")
METRICS = ("accuracy", "tokens_mean", "think_on_rate", "oracle_agreement")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Student's t 0.975 quantiles by degrees of freedom (n - 1); 1.96 beyond."""


def interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample sd and the 95% t-interval half-width of `values` (None with one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("interval: no values")
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None}
    sd = statistics.stdev(values)
    return {"n": n, "mean": mean, "sd": sd, "ci95": T975.get(n - 1, 1.96) * sd / math.sqrt(n)}


def arm_metrics(eval_json: dict) -> dict[str, dict[str, float]]:
    """{category: {metric: value}} of auto mode in one `kat eval --mode all` eval.json."""
    auto = eval_json["summary"]["auto"]
    front = eval_json.get("frontier", {})
    out = {}
    for cat, row in auto.items():
        agreement = front.get(cat, {}).get("auto", {}).get("oracle_agreement")
        out[cat] = {
            "accuracy": row["accuracy"],
            "tokens_mean": row["tokens_mean"],
            "think_on_rate": row["think_on_rate"],
            "oracle_agreement": float("nan") if agreement is None else agreement,
        }
    return out


def aggregate(results: dict[str, dict[int, dict]]) -> dict:
    """`results[arm][seed]` = `arm_metrics(...)` -> per arm, category and metric an `interval`,
    plus `step_srpo_minus_grpo` (paired by seed) where both arms ran the same seeds."""
    out: dict = {"arms": {}, "seeds": {arm: sorted(r) for arm, r in results.items()}}
    for arm, by_seed in results.items():
        cats = next(iter(by_seed.values())).keys()
        out["arms"][arm] = {
            cat: {m: interval([by_seed[s][cat][m] for s in sorted(by_seed)]) for m in METRICS}
            for cat in cats
        }
    a, b = results.get("step_srpo"), results.get("grpo")
    if a and b and sorted(a) == sorted(b):
        out["step_srpo_minus_grpo"] = {
            cat: {m: interval([a[s][cat][m] - b[s][cat][m] for s in sorted(a)]) for m in METRICS}
            for cat in next(iter(a.values()))
        }
    return out


def _cell(stat: dict, digits: int) -> str:
    if stat["ci95"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f}"


def ablation_markdown(agg: dict) -> str:
    """The tables of `ablation.md`: one row per arm (and the paired difference) and category."""
    lines = [
        "# Ablation: Step-SRPO vs GRPO vs no RL (same SFT checkpoint)",
        "",
        "Auto mode, mean over seeds ± 95% interval (Student's t). Seeds: "
        + ", ".join(f"{arm} {seeds}" for arm, seeds in agg["seeds"].items())
        + ".",
        "",
        "| arm | category | accuracy | mean tokens | think-on rate | oracle agreement |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = list(agg["arms"].items())
    if "step_srpo_minus_grpo" in agg:
        rows.append(("step_srpo - grpo (paired)", agg["step_srpo_minus_grpo"]))
    for arm, cats in rows:
        for cat, m in cats.items():
            lines.append(
                f"| {arm} | {cat} | {_cell(m['accuracy'], 3)} | {_cell(m['tokens_mean'], 1)} | "
                f"{_cell(m['think_on_rate'], 3)} | {_cell(m['oracle_agreement'], 3)} |"
            )
    return "\n".join(lines) + "\n"


def ablate(
    out: Path, seeds: Sequence[int], quick: bool = False, nproc: int = 2, seed: int = 0,
    task: str = "easy-hard",
) -> Path:  # fmt: skip
    """The ablation of the finished demo in `out` (made with these quick/nproc/seed/task)."""
    demo = Demo(Path(out), QUICK if quick else FULL, nproc, seed=seed, task=task)
    demo.check_seed()  # the same --seed and --task as the demo in `out`
    return run_ablation(demo, seeds)


def run_ablation(demo: Demo, seeds: Sequence[int]) -> Path:
    """Train and evaluate every arm for every seed under `demo.out / "ablation"` (resumable);
    write ablation.json and ablation.md; return the markdown's path. `demo` is a finished
    `pipeline.Demo` (its scale, nproc and task)."""
    out = demo.out / "ablation"
    sft = latest(demo.out / "student_sft")
    for need in (demo.data / "prompts.jsonl", demo.data / "eval.jsonl"):
        if not need.is_file():
            raise FileNotFoundError(f"{need}: run `kat demo` into {demo.out} first")
    r = Runner(out, total=len(seeds) * (len(ARMS) + 2), echo=demo.r.echo)  # 2 trains, 3 evals
    ckpts: dict[tuple[str, int], Path] = {}
    for seed in seeds:
        for arm, extra in (("step_srpo", []), ("grpo", ["rl.advantages.mode_weight=0"])):
            run = out / f"{arm}_s{seed}"
            train_seed = config_seed("student_rl.yaml") + SEED_STRIDE * seed

            def train(run=run, extra=extra, train_seed=train_seed) -> None:
                r.kat(
                    "train", str(EXAMPLES / "student_rl.yaml"), f"run.dir={run}",
                    f"training.seed={train_seed}", f"rl.prompts={demo.data / 'prompts.jsonl'}",
                    f"training.steps={demo.s.rl_steps}", f"checkpoint.load={sft}", *extra,
                    nproc=demo.nproc,
                )  # fmt: skip

            r.step(f"{arm}_s{seed}", train)
            ckpts[(arm, seed)] = latest(run)
        ckpts[("no_rl", seed)] = sft
    results: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    own = demo.out / "eval" / "student_sft" / "eval.json"
    for (arm, seed), ckpt in ckpts.items():
        dest = out / "eval" / f"{arm}_s{seed}"

        def evaluate(ckpt=ckpt, dest=dest, seed=seed) -> None:
            if ckpt == sft and SEED_STRIDE * seed == demo.stage_seed(0) and own.is_file():
                # The demo ran this very command (same checkpoint, data, flags and seed).
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copytree(own.parent, dest, dirs_exist_ok=True)
                demo.r.echo(f"    {dest}: the demo's own SFT eval ({own.parent}), reused")
                return
            r.kat(
                "eval", "--ckpt", str(ckpt), "--data", str(demo.data / "eval.jsonl"),
                "--mode", "all", "--samples", str(demo.s.eval_samples), "--out", str(dest),
                "--max-new-tokens", "96", "--no-progress", "--seed", str(SEED_STRIDE * seed),
                nproc=demo.nproc,
            )  # fmt: skip

        r.step(f"eval_{arm}_s{seed}", evaluate)
        results[arm][seed] = arm_metrics(json.loads((dest / "eval.json").read_text()))
    agg = aggregate(results)
    atomic_write_text(out / "ablation.json", json.dumps(agg, indent=1) + "\n")
    path = out / "ablation.md"
    atomic_write_text(path, ablation_markdown(agg))
    demo.r.echo(f"    ablation: {path}")
    return path
