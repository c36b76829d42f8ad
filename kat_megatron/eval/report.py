"""Outputs of `kat eval` (eval.json, eval.md, samples.jsonl, plots) and the demo's report.md.

eval.json holds `meta`, `summary` (`metrics.summarize`; with think_on, think_off and auto
evaluated together, auto's groups also carry `oracle_agreement`), `token_reduction`
(`metrics.token_reductions`) and, when both forced modes were evaluated, `frontier`
(`metrics.frontier`: `{category | "overall": {think_off | think_on | oracle | auto: {prompts,
samples, accuracy, tokens_mean, think_on_rate}}}`, auto with `oracle_agreement` and
`tokens_over_oracle`) and `oracle_modes` (`{prompt id: think_on | think_off}`); these keys are
stable. The frontier is also a table in eval.md and frontier.png.

`python -c "from kat_megatron.eval.report import write_report; print(write_report('runs/demo',
rl_metrics_jsonl='runs/demo/rl/metrics.jsonl', eval_json_by_mode={'all':
'runs/demo/eval/eval.json'}))"` writes runs/demo/report.md with its PNG plots.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kat_megatron.eval.metrics import (
    FRONTIER_ROUTERS,
    OVERALL,
    SampleResult,
    frontier,
    oracle_modes,
    reduction_sentence,
    token_reductions,
    with_oracle_agreement,
)
from kat_megatron.eval.plots import bars_by_mode, frontier_plot, lines_over_steps, ordered_modes
from kat_megatron.utils.io import atomic_write_text

TABLE_COLUMNS = (
    ("accuracy", "accuracy", "{:.3f}"),
    ("tokens_mean", "mean tokens", "{:.1f}"),
    ("tokens_p50", "p50", "{:.0f}"),
    ("tokens_p90", "p90", "{:.0f}"),
    ("think_on_rate", "think-on", "{:.2f}"),
    ("format_valid_rate", "format ok", "{:.2f}"),
)


def metrics_table(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """A markdown table with one row per (mode, category); pass@k columns when present."""
    modes = ordered_modes(list(summary))
    ks = sorted(
        {k for m in modes for c in summary[m].values() for k in c if k.startswith("pass@")},
        key=lambda k: int(k[5:]),
    )
    cols = [*TABLE_COLUMNS[:1], *((k, k, "{:.3f}") for k in ks), *TABLE_COLUMNS[1:]]
    lines = [
        "| mode | category | prompts | " + " | ".join(c[1] for c in cols) + " |",
        "|---|---|---:|" + "---:|" * len(cols),
    ]
    for mode in modes:
        cats = sorted(c for c in summary[mode] if c != OVERALL) + [OVERALL]
        for cat in (c for c in cats if c in summary[mode]):
            row = summary[mode][cat]
            cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in cols]
            lines.append(f"| {mode} | {cat} | {row['prompts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_table(front: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """A markdown table of `metrics.frontier`: a row per (category, router), overall last."""
    lines = [
        "| category | router | prompts | accuracy | mean tokens | think-on | oracle agreement "
        "| tokens / oracle |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    cats = sorted(c for c in front if c != OVERALL) + [OVERALL] * (OVERALL in front)
    for cat in cats:
        for router in (r for r in FRONTIER_ROUTERS if r in front[cat]):
            row = front[cat][router]
            agree = f"{row['oracle_agreement']:.3f}" if "oracle_agreement" in row else ""
            ratio = f"{row['tokens_over_oracle']:.2f}" if "tokens_over_oracle" in row else ""
            lines.append(
                f"| {cat} | {router} | {row['prompts']} | {row['accuracy']:.3f} | "
                f"{row['tokens_mean']:.1f} | {row['think_on_rate']:.2f} | {agree} | {ratio} |"
            )
    return "\n".join(lines)


FRONTIER_INTRO = (
    "The oracle router takes, per prompt, the forced mode with the higher pass rate over its "
    "samples (on ties the one with fewer mean output tokens); oracle agreement is the fraction "
    "of auto samples whose chosen mode is the prompt's oracle mode."
)


def frontier_section(front: Mapping[str, Any], png: Path | None, heading: str) -> list[str]:
    """Markdown lines: `heading`, the intro, the frontier table and the PNG link."""
    md = [heading, "", FRONTIER_INTRO, "", frontier_table(front), ""]
    return md + ([f"![frontier]({png.name})", ""] if png else [])


def reduction_lines(reductions: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown bullets, overall first: "- overall: auto uses 31.2% fewer tokens ..."."""
    keys = [OVERALL] * (OVERALL in reductions) + sorted(k for k in reductions if k != OVERALL)
    return [f"- {k}: {reduction_sentence(reductions[k])}" for k in keys]


def plot_summary(summary: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """accuracy.png and tokens.png (mean output tokens) by mode and category."""
    out = Path(out_dir)
    return {
        "accuracy": bars_by_mode(
            summary, "accuracy", out / "accuracy.png", "accuracy (pass@1)", ylim=(0.0, 1.1)
        ),
        "tokens": bars_by_mode(summary, "tokens_mean", out / "tokens.png", "mean output tokens"),
    }


def write_eval_outputs(
    out_dir: str | os.PathLike,
    summary: dict[str, Any],
    samples: Sequence[SampleResult],
    meta: Mapping[str, Any],
) -> dict[str, Path]:
    """eval.json (see the module docstring), eval.md, samples.jsonl and the plots (with both
    forced modes also frontier.png)."""
    out = Path(out_dir)
    reductions = token_reductions(summary)
    front = frontier(samples)
    summary = with_oracle_agreement(summary, front)
    doc = {"meta": dict(meta), "summary": summary, "token_reduction": reductions}
    if front:
        doc.update(frontier=front, oracle_modes=oracle_modes(samples))
    atomic_write_text(out / "eval.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(
        out / "samples.jsonl", "".join(json.dumps(s.to_dict()) + "\n" for s in samples)
    )
    plots = plot_summary(summary, out)
    md = [f"# kat eval: {meta.get('ckpt', '')}", ""]
    md += [f"- {k}: {v}" for k, v in meta.items()]
    md += ["", metrics_table(summary), ""]
    if reductions:
        md += ["## Auto against forced think_on", "", *reduction_lines(reductions), ""]
    if front:
        plots["frontier"] = frontier_plot(front, out / "frontier.png")
        md += frontier_section(front, None, "## Frontier: accuracy against tokens")
    md += [f"![{name}]({path.name})" for name, path in plots.items()]
    atomic_write_text(out / "eval.md", "\n".join(md) + "\n")
    files = {"eval.json": out / "eval.json", "eval.md": out / "eval.md"}
    files["samples.jsonl"] = out / "samples.jsonl"
    return {**files, **plots}


def read_jsonl_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a torn last line is skipped), sorted by `step` when present."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return sorted(rows, key=lambda r: r.get("step", 0))


def merge_eval_summaries(
    eval_json_by_mode: Mapping[str, str | os.PathLike | Mapping[str, Any]],
) -> dict[str, Any]:
    """One `{mode: {category: metrics}}` from several eval.json files (or loaded dicts).

    Under key `mode` the file's summary for that mode is taken; a key that is not a mode of the
    file (e.g. "all") contributes every mode the file holds. Later entries win on conflicts.
    """
    merged: dict[str, Any] = {}
    for key, src in eval_json_by_mode.items():
        doc = src if isinstance(src, Mapping) else json.loads(Path(src).read_text())
        summary = doc.get("summary", doc)
        if key in summary:
            merged[key] = summary[key]
        else:
            merged.update(summary)
    return merged


def merge_frontiers(
    eval_json_by_mode: Mapping[str, str | os.PathLike | Mapping[str, Any]],
) -> dict[str, Any]:
    """The `frontier` of the last of the eval.json files (or loaded dicts) that has one; {}."""
    found: dict[str, Any] = {}
    for src in eval_json_by_mode.values():
        doc = src if isinstance(src, Mapping) else json.loads(Path(src).read_text())
        found = doc.get("frontier") or found
    return found


def _rl_section(
    rows: list[dict[str, Any]], out: Path, step_key: str, reward_key: str, think_on_key: str
) -> list[str]:
    md = ["## Step-SRPO training", ""]
    if not rows:
        return md + ["(no RL metrics rows)", ""]
    reward_keys = [reward_key] + sorted(
        k for k in rows[-1] if k.startswith(reward_key.split("/")[0] + "/") and k != reward_key
    )
    think_keys = [think_on_key] + sorted(k for k in rows[-1] if k.startswith(think_on_key + "/"))
    reward_png = lines_over_steps(rows, reward_keys, out / "rl_reward.png", step_key, "reward",
                                  "reward over RL steps")  # fmt: skip
    think_png = lines_over_steps(rows, think_keys, out / "rl_think_on_rate.png", step_key,
                                 "think-on rate", "think-on rate over RL steps")  # fmt: skip
    first, last = rows[0], rows[-1]
    md += ["| metric | first step | last step |", "|---|---:|---:|"]
    for key in [step_key, *reward_keys, *think_keys]:
        if key in first or key in last:
            md.append(f"| {key} | {_fmt(first.get(key))} | {_fmt(last.get(key))} |")
    md.append("")
    for name, png in (("reward", reward_png), ("think-on rate", think_png)):
        md.append(f"![{name}]({png.name})" if png else f"({name}: no `{name}` values logged)")
    return md + [""]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_report(
    out_dir: str | os.PathLike,
    *,
    rl_metrics_jsonl: str | os.PathLike | None = None,
    eval_json_by_mode: Mapping[str, str | os.PathLike | Mapping[str, Any]] | None = None,
    extra_sections: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    title: str = "AutoThink pipeline report",
    step_key: str = "step",
    reward_key: str = "reward/total",
    think_on_key: str = "think_on_rate",
) -> Path:
    """Write `out_dir/report.md` with PNG plots next to it; return its path.

    - Evaluation (from `eval_json_by_mode`, see `merge_eval_summaries`): the metrics table,
      auto-vs-think_on token reduction, accuracy and mean tokens per mode and category, and the
      frontier table and frontier.png when an eval.json has a `frontier` (`merge_frontiers`).
    - Step-SRPO (from `rl_metrics_jsonl`): reward (`reward_key` and its `reward/*` siblings) and
      think-on rate (`think_on_key` and `think_on_key/<category>`) over `step_key`, first/last.
    - `extra_sections`: (title, markdown) pairs appended as they are.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    if eval_json_by_mode:
        summary = merge_eval_summaries(eval_json_by_mode)
        md += ["## Evaluation", "", metrics_table(summary), ""]
        reductions = token_reductions(summary)
        if reductions:
            md += ["Auto against forced think_on:", "", *reduction_lines(reductions), ""]
        plots = plot_summary(summary, out)
        md += [f"![{name}]({path.name})" for name, path in plots.items()] + [""]
        front = merge_frontiers(eval_json_by_mode)
        if front:
            png = frontier_plot(front, out / "frontier.png")
            md += frontier_section(front, png, "### Frontier: accuracy against tokens")
    if rl_metrics_jsonl is not None:
        rows = read_jsonl_rows(rl_metrics_jsonl)
        md += _rl_section(rows, out, step_key, reward_key, think_on_key)
    sections = extra_sections.items() if isinstance(extra_sections, Mapping) else extra_sections
    for name, body in sections or ():
        md += [f"## {name}", "", body.rstrip(), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
