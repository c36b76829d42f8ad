"""Per-step rollout metrics of `kat train` with `stage: rl` (metrics.jsonl, TensorBoard, wandb).

`rollout_metrics(rows, mode_weight)` summarises every rollout a step generated (all data-parallel
ranks, all dynamic-sampling rounds; forced-mode probes excluded), i.e. the behaviour of the
policy that sampled them:
- `reward/total` = mean of answer_reward + mode_weight * r_mode (what Step-SRPO optimises; with
  GRPO mode_weight = 0), `reward/answer`, `reward/mode`, `reward/<component>` per reward component;
- `acc` (mean correctness), `acc/think_on`, `acc/think_off` (among rollouts in that mode),
  `acc/<category>`;
- `think_on_rate` (rollouts that chose think_on; a rollout without a mode token counts as not
  think_on), `think_on_rate/<category>`, `no_mode_rate`, `format_ok`;
- `response_tokens`, `response_tokens/think_on`, `response_tokens/think_off`, `truncated_rate`.
A key whose population is empty this step (e.g. no think_off rollout) is left out.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from kat_megatron.data.autothink import MODES


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def rollout_metrics(rows: list[dict[str, Any]], mode_weight: float) -> dict[str, float]:
    """Metrics of one step's rollouts (rows from `rl.rollouts._rows`); see the module doc."""
    if not rows:
        return {}
    out: dict[str, float] = {}
    answer = [r["answer_reward"] for r in rows]
    r_mode = [r["r_mode"] for r in rows]
    out["reward/total"] = _mean([a + mode_weight * m for a, m in zip(answer, r_mode)])
    out["reward/answer"] = _mean(answer)
    out["reward/mode"] = _mean(r_mode)
    for name in sorted(rows[0]["components"]):
        out[f"reward/{name}"] = _mean([r["components"][name] for r in rows])
    out["acc"] = _mean([r["correct"] for r in rows])
    out["think_on_rate"] = _mean([float(r["mode"] == "think_on") for r in rows])
    out["no_mode_rate"] = _mean([float(r["mode"] is None) for r in rows])
    out["format_ok"] = _mean([r["format_ok"] for r in rows])
    out["response_tokens"] = _mean([float(r["tokens"]) for r in rows])
    out["truncated_rate"] = _mean([float(r["truncated"]) for r in rows])
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if sel:
            out[f"acc/{mode}"] = _mean([r["correct"] for r in sel])
            out[f"response_tokens/{mode}"] = _mean([float(r["tokens"]) for r in sel])
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    for cat in sorted(by_cat):
        sel = by_cat[cat]
        name = f"category_{cat}" if cat in MODES else cat  # never shadow acc/think_on
        out[f"acc/{name}"] = _mean([r["correct"] for r in sel])
        out[f"think_on_rate/{name}"] = _mean([float(r["mode"] == "think_on") for r in sel])
        out[f"reward/total/{name}"] = _mean(
            [r["answer_reward"] + mode_weight * r["r_mode"] for r in sel]
        )
    return out
