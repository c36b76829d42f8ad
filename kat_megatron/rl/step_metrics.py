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
A key whose population is empty this step (e.g. no think_off rollout) is left out. The reward and
accuracy keys (`reward/*`, `acc*`) leave out the groups dropped for a reward error (a rollout
with `reward_error`: its 0 is a placeholder, and the group has no mode reward); the behaviour
keys (mode, format, tokens) cover every rollout.

`reward_error_metrics` gives `reward_errors` (rollouts and probes whose reward failed for an
internal reason, all ranks) and `reward_error_rate` (over every rollout scored, probes
included); `report_reward_errors` logs the first few at WARNING and enforces
`rl.max_reward_error_rate`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from kat_megatron.data.autothink import MODES

log = logging.getLogger("kat")

LOGGED_ERRORS = 3
"""Reward errors quoted per step in the WARNING line."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def rollout_metrics(rows: list[dict[str, Any]], mode_weight: float) -> dict[str, float]:
    """Metrics of one step's rollouts (rows from `rl.rollouts._rows`); see the module doc."""
    if not rows:
        return {}
    errored = {r["key"] for r in rows if r.get("reward_error") is not None and "key" in r}
    scored = [r for r in rows if r.get("reward_error") is None and r.get("key") not in errored]
    out = _reward_metrics(scored, mode_weight)
    out["think_on_rate"] = _mean([float(r["mode"] == "think_on") for r in rows])
    out["no_mode_rate"] = _mean([float(r["mode"] is None) for r in rows])
    out["format_ok"] = _mean([r["format_ok"] for r in rows])
    out["response_tokens"] = _mean([float(r["tokens"]) for r in rows])
    out["truncated_rate"] = _mean([float(r["truncated"]) for r in rows])
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if sel:
            out[f"response_tokens/{mode}"] = _mean([float(r["tokens"]) for r in sel])
    for name, sel in _by_category(rows).items():
        out[f"think_on_rate/{name}"] = _mean([float(r["mode"] == "think_on") for r in sel])
    return out


def _by_category(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows per metric name of their category, sorted (a category named like a mode is
    `category_<name>`: never shadow acc/think_on)."""
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    return {f"category_{c}" if c in MODES else c: by_cat[c] for c in sorted(by_cat)}


def _reward_metrics(rows: list[dict[str, Any]], mode_weight: float) -> dict[str, float]:
    """`reward/*` and `acc*` over rows whose rewards were all computed ({} when none)."""
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
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if sel:
            out[f"acc/{mode}"] = _mean([r["correct"] for r in sel])
    for name, sel in _by_category(rows).items():
        out[f"acc/{name}"] = _mean([r["correct"] for r in sel])
        out[f"reward/total/{name}"] = _mean(
            [r["answer_reward"] + mode_weight * r["r_mode"] for r in sel]
        )
    return out


def reward_errors(rows: list[dict[str, Any]], probe_errors: list[str]) -> list[str]:
    """Every reward error of a step: the rollouts' (in row order), then the probes'."""
    return [r["reward_error"] for r in rows if r.get("reward_error") is not None] + list(
        probe_errors
    )


def reward_error_metrics(
    rows: list[dict[str, Any]], probe_errors: list[str], probes: int
) -> dict[str, float]:
    """`reward_errors` (count) and `reward_error_rate` (over the `len(rows) + probes` rollouts
    scored this step); both always present."""
    n = len(reward_errors(rows, probe_errors))
    return {"reward_errors": n, "reward_error_rate": n / max(len(rows) + probes, 1)}


def report_reward_errors(
    step: int,
    errors: list[str],
    metrics: dict[str, float],
    max_rate: float | None,
    warn: bool = True,
) -> None:
    """Log the first `LOGGED_ERRORS` errors at WARNING (when `warn`: rank 0), then raise
    RuntimeError when `metrics["reward_error_rate"]` exceeds `max_rate` (None: no limit).
    Call it on every rank with the same (gathered) values so that all of them stop."""
    if not errors:
        return
    rate = metrics["reward_error_rate"]
    shown = "; ".join(repr(e[:300]) for e in errors[:LOGGED_ERRORS])
    if warn:
        log.warning(
            "step %d: %d reward computation(s) failed for an internal reason (rate %.3f), "
            "their groups are not trained on; first: %s",
            step,
            len(errors),
            rate,
            shown,
        )
    if max_rate is not None and rate > max_rate:
        raise RuntimeError(
            f"step {step}: reward_error_rate {rate:.3f} ({len(errors)} failed reward "
            f"computations) exceeds rl.max_reward_error_rate={max_rate}: the verifiers are "
            f"failing, not the policy (first: {shown}); fix the verifier or sandbox set-up, or "
            "raise rl.max_reward_error_rate"
        )
