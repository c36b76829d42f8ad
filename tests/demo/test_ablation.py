"""`kat demo --ablation` arithmetic (`kat_megatron/demo/ablation.py`); the runs themselves are
exercised at quick scale by tests/demo/test_demo.py.

The 95% interval is checked against values computed here from the definition (mean, sample sd,
t quantile); the t quantiles against published table values to 3 decimals (scipy is not a
dependency)."""

from __future__ import annotations

import math

import pytest


def test_interval_matches_the_definition():
    from kat_megatron.demo.ablation import T975, interval

    assert T975[2] == pytest.approx(4.303, abs=1e-3) and T975[9] == pytest.approx(2.262, abs=1e-3)
    values = [0.8, 0.9, 0.7]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    got = interval(values)
    assert got["n"] == 3 and got["mean"] == pytest.approx(mean)
    assert got["sd"] == pytest.approx(sd) and got["ci95"] == pytest.approx(
        4.303 * sd / math.sqrt(3)
    )
    assert interval([0.5]) == {"n": 1, "mean": 0.5, "sd": None, "ci95": None}
    assert interval([0.5, 0.5])["ci95"] == 0.0
    with pytest.raises(ValueError):
        interval([])


def _eval(acc: float, tokens: float, on: float, agree: float) -> dict:
    row = {"accuracy": acc, "tokens_mean": tokens, "think_on_rate": on}
    return {
        "summary": {"auto": {"hard": row, "overall": row}},
        "frontier": {"hard": {"auto": {"oracle_agreement": agree}},
                     "overall": {"auto": {"oracle_agreement": agree}}},
    }  # fmt: skip


def test_aggregate_pairs_the_difference_by_seed_and_writes_the_table():
    from kat_megatron.demo.ablation import ablation_markdown, aggregate, arm_metrics

    results = {
        "step_srpo": {0: arm_metrics(_eval(0.9, 40, 0.5, 0.8)), 1: arm_metrics(_eval(0.7, 50, 0.6, 0.9))},
        "grpo": {0: arm_metrics(_eval(0.8, 45, 0.4, 0.7)), 1: arm_metrics(_eval(0.7, 48, 0.6, 0.6))},
        "no_rl": {0: arm_metrics(_eval(0.6, 60, 0.2, 0.5)), 1: arm_metrics(_eval(0.6, 60, 0.2, 0.5))},
    }  # fmt: skip
    agg = aggregate(results)
    assert agg["seeds"] == {"step_srpo": [0, 1], "grpo": [0, 1], "no_rl": [0, 1]}
    assert agg["arms"]["step_srpo"]["hard"]["accuracy"]["mean"] == pytest.approx(0.8)
    assert agg["arms"]["no_rl"]["overall"]["tokens_mean"]["ci95"] == 0.0
    diff = agg["step_srpo_minus_grpo"]["hard"]
    # paired: differences 0.1 and 0.0 (mean 0.05, sd 0.0707, t(1) = 12.706)
    assert diff["accuracy"]["mean"] == pytest.approx(0.05)
    assert diff["accuracy"]["ci95"] == pytest.approx(12.706 * math.sqrt(0.005) / math.sqrt(2))
    assert diff["oracle_agreement"]["mean"] == pytest.approx(0.2)
    md = ablation_markdown(agg)
    assert "| step_srpo | hard | 0.800 ± " in md and "| step_srpo - grpo (paired) | hard |" in md
    unpaired = aggregate({"step_srpo": results["step_srpo"], "grpo": {0: results["grpo"][0]}})
    assert "step_srpo_minus_grpo" not in unpaired


def test_bad_seeds_are_one_line_errors():
    from kat_megatron.commands.demo import _seeds

    assert _seeds("0,1,2") == [0, 1, 2]
    for bad in ("a,b", "", "1,1"):
        with pytest.raises(ValueError, match="--seeds"):
            _seeds(bad)
