"""Evaluation metrics against independent references: pass@k against the combinatorial formula
and brute-force enumeration of k-subsets, percentiles against numpy and hand-computed values,
group summaries and the token reduction against hand-computed numbers.

Tolerances: 1e-12 absolute where float64 arithmetic on the same quantities differs only by
rounding (products of at most 20 factors vs ratios of exact integer binomials)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from kat_megatron.eval.metrics import (
    SampleResult,
    pass_at_k,
    reduction_sentence,
    summarize,
    summarize_group,
    token_reduction,
    token_reductions,
    token_stats,
)


def sample(pid, correct, tokens=10, mode="auto", category="easy", k=0, parsed="think_off",
           valid=True, finish="stop"):  # fmt: skip
    return SampleResult(pid, category, mode, k, "", "", correct, valid, parsed, tokens, finish)


def test_pass_at_k_matches_combinatorial_formula_and_enumeration():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert abs(pass_at_k(n, c, k) - exact) <= 1e-12, (n, c, k)
    # Brute force: the fraction of k-subsets of the n samples that hold a correct one.
    for n, c, k in [(5, 2, 2), (6, 1, 3), (7, 3, 4), (4, 0, 2), (4, 4, 1)]:
        flags = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(flags[i] for i in s) for s in subsets) / len(subsets)
        assert abs(pass_at_k(n, c, k) - brute) <= 1e-12
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-12)  # pass@1 is the mean
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(3, 1, 4)


def test_token_stats_against_numpy_and_hand_values():
    # numpy's default (linear) percentiles of 1..10: p50 = 5.5, p90 = 1 + 0.9 * 9 = 9.1
    assert token_stats(range(1, 11)) == pytest.approx({"mean": 5.5, "p50": 5.5, "p90": 9.1})
    rng = random.Random(0)
    values = [rng.randint(1, 300) for _ in range(101)]
    stats = token_stats(values)
    assert stats["p50"] == pytest.approx(sorted(values)[50])  # odd count: the middle value
    assert stats["p90"] == pytest.approx(float(np.percentile(values, 90)))
    assert stats["mean"] == pytest.approx(sum(values) / len(values))
    assert token_stats([]) == {"mean": 0.0, "p50": 0.0, "p90": 0.0}


def test_group_summary_by_hand():
    # prompt a: 3 of 4 correct; prompt b: 0 of 4; prompt c: 4 of 4
    rows = [sample("a", i < 3, tokens=10 * (i + 1), k=i) for i in range(4)]
    rows += [sample("b", False, tokens=5, k=i, parsed="think_on", valid=i % 2 == 0)
             for i in range(4)]  # fmt: skip
    rows += [sample("c", True, tokens=1, k=i, parsed=None, finish="length") for i in range(4)]
    s = summarize_group(rows, ks=(2, 4, 8))
    assert s["prompts"] == 3 and s["samples"] == 12
    assert s["accuracy"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    # pass@2: a = 1 - C(1,2)/C(4,2) = 1; b = 0; c = 1
    assert s["pass@2"] == pytest.approx(2 / 3)
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in s  # more than the 4 samples per prompt
    assert s["think_on_rate"] == pytest.approx(4 / 12)
    assert s["format_valid_rate"] == pytest.approx(10 / 12)
    assert s["truncated_rate"] == pytest.approx(4 / 12)
    tokens = [10, 20, 30, 40, 5, 5, 5, 5, 1, 1, 1, 1]
    assert s["tokens_mean"] == pytest.approx(sum(tokens) / 12)
    assert s["tokens_p50"] == pytest.approx(5.0)


def test_summary_by_mode_and_category_and_token_reduction():
    rows = []
    for pid, cat in (("e1", "easy"), ("e2", "easy"), ("h1", "hard"), ("h2", "hard")):
        on_tokens = 20 if cat == "easy" else 40
        rows.append(sample(pid, True, on_tokens, "think_on", cat, parsed="think_on"))
        auto_hard = cat == "hard"
        rows.append(sample(pid, pid != "h2", on_tokens if auto_hard else 6, "auto", cat,
                           parsed="think_on" if auto_hard else "think_off"))  # fmt: skip
    summary = summarize(rows)
    assert set(summary) == {"auto", "think_on"}
    assert list(summary["auto"]) == ["easy", "hard", "overall"]
    assert summary["auto"]["hard"]["accuracy"] == 0.5
    assert summary["auto"]["easy"]["think_on_rate"] == 0.0
    assert summary["auto"]["overall"]["think_on_rate"] == 0.5
    red = token_reductions(summary)
    # overall: auto mean = (6 + 6 + 40 + 40) / 4 = 23, think_on mean = 30
    assert red["overall"]["reduction"] == pytest.approx(1 - 23 / 30)
    assert red["overall"]["accuracy_delta"] == pytest.approx(0.75 - 1.0)
    assert red["easy"]["reduction"] == pytest.approx(1 - 6 / 20)
    assert red["hard"]["reduction"] == pytest.approx(0.0)
    sentence = reduction_sentence(red["overall"])
    assert sentence.startswith("auto uses 23.3% fewer tokens") and "0.750 vs 1.000" in sentence
    more = token_reduction({"tokens_mean": 12.0, "accuracy": 1.0, "think_on_rate": 1.0},
                           {"tokens_mean": 10.0, "accuracy": 1.0})  # fmt: skip
    assert more["reduction"] == pytest.approx(-0.2)
    assert "20.0% more tokens" in reduction_sentence(more)
    assert token_reductions({"auto": summary["auto"]}) == {}
