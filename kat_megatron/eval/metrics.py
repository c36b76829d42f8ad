"""Evaluation metrics as pure functions over scored samples (no torch, no I/O).

`python -c "from kat_megatron.eval.metrics import pass_at_k; print(pass_at_k(10, 3, 5))"`

- pass@k: the unbiased estimator of Chen et al. (2021), `1 - C(n - c, k) / C(n, k)` for n samples
  of which c are correct, averaged over prompts; pass@1 is the mean correctness of the samples.
- token statistics: mean, p50 and p90 of output tokens (numpy's linear percentiles).
- think-on rate: the fraction of samples whose parsed mode is think_on (samples without a mode
  token count as not thinking); format-valid rate: samples the strict AutoThink parser accepts.
- token reduction of auto against think_on (KAT-V1's headline metric): `1 - mean_auto /
  mean_think_on`, reported with both accuracies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

OVERALL = "overall"
"""Key of the all-categories group in summaries."""


@dataclass(frozen=True)
class SampleResult:
    """One scored generation: prompt `id`, its `category`, the requested `mode` (auto, think_on,
    think_off) and the `sample` index among the prompt's K samples."""

    id: str
    category: str
    mode: str
    sample: int
    output: str
    """The full answer as parsed: `<judge>\\n` + forced prefix (if any) + generated text."""
    answer: str
    """The lenient-parsed answer that was verified."""
    correct: bool
    format_valid: bool
    parsed_mode: str | None
    output_tokens: int
    """Generated tokens plus the tokens of a forced-mode prefix (so modes compare fairly)."""
    finish_reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples with c correct: `1 - C(n-c, k) / C(n, k)`.

    Computed as `1 - prod_{i=n-c+1..n} (1 - k / i)` (no large binomials).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: expected 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def token_stats(values: Iterable[float]) -> dict[str, float]:
    """mean, p50 and p90 of `values` (zeros when empty)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0}
    return {
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
    }


def summarize_group(samples: Sequence[SampleResult], ks: Sequence[int] = ()) -> dict[str, Any]:
    """Metrics of one group of samples (one mode, one category or all).

    accuracy is pass@1: per prompt the fraction of correct samples, averaged over prompts (equal
    to the mean over samples when every prompt has the same number of samples). `pass@k` for
    each k in `ks` with 1 < k <= the smallest per-prompt sample count.
    """
    by_prompt: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        by_prompt[s.id].append(s.correct)
    n_min = min((len(v) for v in by_prompt.values()), default=0)
    out: dict[str, Any] = {
        "prompts": len(by_prompt),
        "samples": len(samples),
        "accuracy": (
            float(np.mean([np.mean(v) for v in by_prompt.values()])) if by_prompt else 0.0
        ),
    }
    for k in ks:
        if 1 < k <= n_min:
            out[f"pass@{k}"] = float(
                np.mean([pass_at_k(len(v), sum(v), k) for v in by_prompt.values()])
            )
    tokens = token_stats(s.output_tokens for s in samples)
    out.update({f"tokens_{name}": value for name, value in tokens.items()})
    n = max(len(samples), 1)
    out["think_on_rate"] = sum(s.parsed_mode == "think_on" for s in samples) / n
    out["format_valid_rate"] = sum(s.format_valid for s in samples) / n
    out["truncated_rate"] = sum(s.finish_reason == "length" for s in samples) / n
    return out


def summarize(samples: Sequence[SampleResult], ks: Sequence[int] = ()) -> dict[str, Any]:
    """`{mode: {category: metrics, ..., "overall": metrics}}` (categories sorted)."""
    by_mode: dict[str, list[SampleResult]] = defaultdict(list)
    for s in samples:
        by_mode[s.mode].append(s)
    result: dict[str, Any] = {}
    for mode, group in by_mode.items():
        cats: dict[str, list[SampleResult]] = defaultdict(list)
        for s in group:
            cats[s.category].append(s)
        result[mode] = {c: summarize_group(cats[c], ks) for c in sorted(cats)}
        result[mode][OVERALL] = summarize_group(group, ks)
    return result


def token_reduction(auto: dict[str, Any], think_on: dict[str, Any]) -> dict[str, Any]:
    """Auto against forced think_on for one group's metrics (`summarize_group` outputs).

    `reduction` = 1 - auto mean tokens / think_on mean tokens (positive: auto is cheaper);
    `accuracy_delta` = auto accuracy - think_on accuracy.
    """
    on_tokens, auto_tokens = think_on["tokens_mean"], auto["tokens_mean"]
    reduction = 1.0 - auto_tokens / on_tokens if on_tokens > 0 else 0.0
    return {
        "auto_tokens_mean": auto_tokens,
        "think_on_tokens_mean": on_tokens,
        "reduction": reduction,
        "auto_accuracy": auto["accuracy"],
        "think_on_accuracy": think_on["accuracy"],
        "accuracy_delta": auto["accuracy"] - think_on["accuracy"],
        "auto_think_on_rate": auto["think_on_rate"],
    }


def reduction_sentence(red: dict[str, Any]) -> str:
    """ "auto uses 31.2% fewer tokens at accuracy 0.820 vs 0.830 (think_on)"."""
    pct = 100.0 * red["reduction"]
    word = "fewer" if pct >= 0 else "more"
    return (
        f"auto uses {abs(pct):.1f}% {word} tokens than think_on "
        f"({red['auto_tokens_mean']:.1f} vs {red['think_on_tokens_mean']:.1f}) at accuracy "
        f"{red['auto_accuracy']:.3f} vs {red['think_on_accuracy']:.3f}"
    )


def token_reductions(summary: dict[str, Any]) -> dict[str, Any]:
    """`{category: token_reduction(...)}` for every group present in both auto and think_on."""
    if "auto" not in summary or "think_on" not in summary:
        return {}
    auto, on = summary["auto"], summary["think_on"]
    return {c: token_reduction(auto[c], on[c]) for c in auto if c in on}


FRONTIER_ROUTERS = ("think_off", "think_on", "oracle", "auto")
"""Rows of the frontier: the two forced modes, the per-prompt oracle router, the model's choice."""
FRONTIER_KEYS = ("prompts", "samples", "accuracy", "tokens_mean", "think_on_rate")
"""The `summarize_group` metrics each frontier row keeps."""


def _mode_stats(samples: Sequence[SampleResult]) -> dict[tuple[str, str], tuple[int, int, int]]:
    """{(prompt id, mode): (correct, samples, output tokens)}."""
    acc: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for s in samples:
        row = acc[(s.id, s.mode)]
        row[0] += int(s.correct)
        row[1] += 1
        row[2] += s.output_tokens
    return {k: (v[0], v[1], v[2]) for k, v in acc.items()}


def oracle_modes(samples: Sequence[SampleResult]) -> dict[str, str]:
    """The oracle router's mode of every prompt with samples in both forced modes.

    The forced mode with the higher pass rate (correct / samples of that prompt in that mode);
    on equal pass rates the cheaper one, with fewer mean output tokens on that prompt; think_off
    when those are equal too. Rates and means are compared as exact fractions.
    """
    stats = _mode_stats(samples)
    out = {}
    for pid in dict.fromkeys(s.id for s in samples):
        if (pid, "think_on") not in stats or (pid, "think_off") not in stats:
            continue
        c_on, n_on, t_on = stats[(pid, "think_on")]
        c_off, n_off, t_off = stats[(pid, "think_off")]
        on_better = c_on * n_off > c_off * n_on
        tie_on_cheaper = c_on * n_off == c_off * n_on and t_on * n_off < t_off * n_on
        out[pid] = "think_on" if on_better or tie_on_cheaper else "think_off"
    return out


def _frontier_group(
    samples: Sequence[SampleResult], oracle: dict[str, str]
) -> dict[str, dict[str, Any]]:
    by_mode: dict[str, list[SampleResult]] = defaultdict(list)
    for s in samples:
        by_mode[s.mode].append(s)
    groups = {m: by_mode[m] for m in ("think_off", "think_on")}
    groups["oracle"] = [s for s in samples if s.mode == oracle[s.id]]
    if by_mode.get("auto"):
        groups["auto"] = by_mode["auto"]
    rows = {}
    for name, group in groups.items():
        metrics = summarize_group(group)
        rows[name] = {k: metrics[k] for k in FRONTIER_KEYS}
    if "auto" in rows:
        auto = groups["auto"]
        rows["auto"]["oracle_agreement"] = sum(s.parsed_mode == oracle[s.id] for s in auto) / len(
            auto
        )
        oracle_tokens = rows["oracle"]["tokens_mean"]
        rows["auto"]["tokens_over_oracle"] = (
            rows["auto"]["tokens_mean"] / oracle_tokens if oracle_tokens > 0 else 0.0
        )
    return rows


def frontier(samples: Sequence[SampleResult]) -> dict[str, Any]:
    """Accuracy against mean output tokens of think_off, think_on, the oracle router and auto.

    `{category: {router: metrics}, ..., "overall": {...}}` (categories sorted), over the prompts
    with samples in both forced modes (`oracle_modes`; other prompts are left out of every row,
    auto's included); `{}` when there are none. Each router's metrics are `FRONTIER_KEYS` of
    `summarize_group` over its samples: the oracle router's are, per prompt, the samples of its
    oracle mode (accuracy = mean over prompts of that mode's pass rate; think_on_rate = the
    fraction of its samples routed to think_on). auto also gets `oracle_agreement` (the
    fraction of auto samples whose parsed mode is the prompt's oracle mode; no mode token
    counts as a disagreement) and `tokens_over_oracle` (its mean tokens / the oracle's).
    """
    oracle = oracle_modes(samples)
    kept = [s for s in samples if s.id in oracle and s.mode in FRONTIER_ROUTERS]
    if not kept:
        return {}
    cats: dict[str, list[SampleResult]] = defaultdict(list)
    for s in kept:
        cats[s.category].append(s)
    out = {c: _frontier_group(cats[c], oracle) for c in sorted(cats)}
    out[OVERALL] = _frontier_group(kept, oracle)
    return out


def with_oracle_agreement(summary: dict[str, Any], front: dict[str, Any]) -> dict[str, Any]:
    """A copy of `summary` whose auto groups carry `oracle_agreement` from `frontier`'s rows."""
    if "auto" not in summary:
        return summary
    auto = {
        cat: {**row, "oracle_agreement": front[cat]["auto"]["oracle_agreement"]}
        if "auto" in front.get(cat, {})
        else row
        for cat, row in summary["auto"].items()
    }
    return {**summary, "auto": auto}
