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
