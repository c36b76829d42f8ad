"""Advantages: Step-SRPO against hand-computed groups, GRPO against an explicit formula."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from kat_megatron.data.autothink import AutoThinkResponse, render_response
from kat_megatron.data.tokenizer import encode_text
from kat_megatron.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    GroupAdvantages,
    compute_advantages,
    has_signal,
    mode_token_index,
    normalize_group,
    token_advantages,
)
from kat_megatron.rl.rewards import RolloutScore

# eps = 1e-6 in the denominators shifts normalised values by ~1e-6 relative: tolerance 1e-5.
TOL = 1e-5


def S(mode, correct, answer_reward=None):  # noqa: N802  (a short constructor for tables)
    r = float(correct) if answer_reward is None else answer_reward
    return RolloutScore(mode, float(correct), 1.0, 0.0, r)


def close(got, expected, tol=TOL):
    assert len(got) == len(expected)
    assert all(math.isclose(g, e, abs_tol=tol) for g, e in zip(got, expected)), (got, expected)


def test_step_srpo_hand_computed_group():
    group = [S("think_off", 1), S("think_off", 1), S("think_on", 1), S("think_on", 0)]
    adv = compute_advantages(group, AdvantageConfig())
    # p_on = 1/2, p_off = 2/2 -> think_off; r_mode = [1, 1, -1, -1]: mean 0, unbiased
    # std = sqrt(4/3) -> A_mode = +-sqrt(3)/2 = +-0.866025
    # r_ans = [1, 1, 1, 0]: mean 0.75, deviations [.25, .25, .25, -.75], unbiased var
    # = 0.75 / 3 = 0.25 -> std 0.5 -> A_ans = [0.5, 0.5, 0.5, -1.5]
    assert (adv.preferred_mode, adv.p_on, adv.p_off) == ("think_off", 0.5, 1.0)
    assert adv.r_mode == [1.0, 1.0, -1.0, -1.0]
    h = math.sqrt(3) / 2
    close(adv.a_answer, [0.5, 0.5, 0.5, -1.5])
    close(adv.a_judge, [h + 0.5, h + 0.5, -h + 0.5, -h - 1.5])
    # mode_weight and beta scale the two parts of the judge advantage
    adv = compute_advantages(group, AdvantageConfig(mode_weight=0.5, beta=0.0))
    close(adv.a_judge, [h / 2, h / 2, -h / 2, -h / 2])
    close(adv.a_answer, [0.5, 0.5, 0.5, -1.5])


def test_no_mode_token_gets_minus_one_and_delta():
    # r_mode: p_on = 1, p_off = 1/2; delta = 0.5 -> 0.5 >= 1 - 0.5 -> think_off preferred;
    # the rollout without a mode token gets -1: r_mode = [-1, 1, 1, -1]
    group = [S("think_on", 1), S("think_off", 1), S("think_off", 0), S(None, 0)]
    adv = compute_advantages(group, AdvantageConfig(delta=0.5, std_normalize=False))
    assert adv.preferred_mode == "think_off" and adv.r_mode == [-1.0, 1.0, 1.0, -1.0]
    # without std: A_mode = r_mode - 0 ; A_ans = [1, 1, 0, 0] - 0.5
    close(adv.a_answer, [0.5, 0.5, -0.5, -0.5])
    close(adv.a_judge, [-0.5, 1.5, 0.5, -1.5])
    adv = compute_advantages(group, AdvantageConfig(delta=0.0))
    assert adv.preferred_mode == "think_on"  # 0.5 >= 1 - 0? no


def test_leave_one_out_hand_computed():
    group = [S("think_on", 1), S("think_on", 1), S("think_on", 1), S("think_on", 0)]
    cfg = AdvantageConfig(leave_one_out=True, std_normalize=False)
    adv = compute_advantages(group, cfg)
    # baseline_i = mean of the other three: [2/3, 2/3, 2/3, 1] -> A = [1/3, 1/3, 1/3, -1];
    # one mode only: no preference, r_mode = 0, judge tokens get beta * A_ans
    close(adv.a_answer, [1 / 3, 1 / 3, 1 / 3, -1.0])
    close(adv.a_judge, adv.a_answer)
    assert adv.preferred_mode is None and adv.p_off is None and adv.r_mode == [0.0] * 4
    # with std: the same numerators over the group's unbiased std 0.5
    adv = compute_advantages(group, AdvantageConfig(leave_one_out=True))
    close(adv.a_answer, [2 / 3, 2 / 3, 2 / 3, -2.0])


def test_probes_are_evidence_only():
    group = [S("think_on", 1), S("think_on", 0), S(None, 0)]
    assert compute_advantages(group, AdvantageConfig()).preferred_mode is None
    probes = [S("think_off", 1), S("think_off", 1)]
    adv = compute_advantages(group, AdvantageConfig(), probes)
    # p_on = 1/2 (group only), p_off = 1 (probes) -> think_off; r_mode = [-1, -1, -1]:
    # constant, so the normalised A_mode is 0; unnormalised (mode_normalize=False) it is -1
    assert (adv.preferred_mode, adv.p_on, adv.p_off) == ("think_off", 0.5, 1.0)
    assert len(adv.a_judge) == 3  # probes are not trained on
    close(adv.a_judge, adv.a_answer)
    adv = compute_advantages(group, AdvantageConfig(mode_normalize=False), probes)
    close([j - a for j, a in zip(adv.a_judge, adv.a_answer)], [-1.0, -1.0, -1.0])


def grpo_reference(rewards: list[float], eps: float) -> list[float]:
    """DeepSeekMath's outcome-supervision GRPO: (r_i - mean(r)) / std(r), sample std."""
    mean = sum(rewards) / len(rewards)
    std = statistics.stdev(rewards)
    return [(r - mean) / (std + eps) for r in rewards]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_is_the_zero_mode_weight_special_case(seed):
    rng = random.Random(seed)
    modes = ["think_on", "think_off", None]
    group = [S(rng.choice(modes), rng.random() < 0.5, rng.uniform(-1, 2)) for _ in range(8)]
    expected = grpo_reference([s.answer_reward for s in group], 1e-6)
    grpo = compute_advantages(group, AdvantageConfig(estimator="grpo", mode_weight=3.0, beta=0.2))
    close(grpo.a_answer, expected, 1e-12)  # float64 arithmetic on both sides
    close(grpo.a_judge, expected, 1e-12)
    srpo = compute_advantages(group, AdvantageConfig(mode_weight=0.0, beta=1.0))
    close(srpo.a_judge, expected, 1e-12)
    close(srpo.a_answer, expected, 1e-12)
    tok = token_advantages(grpo.a_judge[0], grpo.a_answer[0], 2, 6)
    assert torch.allclose(tok, torch.full((6,), expected[0], dtype=torch.float32))


def test_degenerate_groups():
    same = [S("think_on", 1), S("think_on", 1), S("think_on", 1)]
    adv = compute_advantages(same, AdvantageConfig())
    assert adv.a_answer == [0.0] * 3 and not has_signal(adv)  # dynamic sampling drops it
    # identical answers but a mode preference still give Step-SRPO a signal (GRPO none)
    mixed = [S("think_on", 1), S("think_off", 1)]
    assert has_signal(compute_advantages(mixed, AdvantageConfig()))
    assert not has_signal(compute_advantages(mixed, AdvantageConfig(estimator="grpo")))
    assert normalize_group([3.0], True, True, 1e-6) == [0.0]
    # identical rewards whose float mean is off by an ulp: still no signal (was kept before)
    assert sum([0.1] * 3) / 3 != 0.1
    for est in ("step_srpo", "grpo"):
        for loo in (False, True):
            cfg = AdvantageConfig(estimator=est, leave_one_out=loo)
            ulp = compute_advantages([S("think_on", 1, 0.1) for _ in range(3)], cfg)
            assert ulp.a_answer == [0.0] * 3 and not has_signal(ulp), (est, loo, ulp)
    with pytest.raises(ValueError, match="empty group"):
        compute_advantages([], AdvantageConfig())


def test_config_validation():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "step_srpo"}
    with pytest.raises(ValueError, match=r"estimator='ppo': unknown; known: \['grpo', 'step_s"):
        AdvantageConfig(estimator="ppo")
    with pytest.raises(ValueError, match="eps"):
        AdvantageConfig(eps=0.0)


def test_token_advantages():
    t = token_advantages(2.0, -1.0, 2, 5)
    assert t.dtype == torch.float32 and t.tolist() == [2.0, 2.0, 2.0, -1.0, -1.0]
    assert token_advantages(2.0, -1.0, None, 3).tolist() == [2.0, 2.0, 2.0]  # never left judge
    assert token_advantages(2.0, -1.0, 7, 3).tolist() == [2.0, 2.0, 2.0]
    assert token_advantages(2.0, -1.0, 0, 0).shape == (0,)


def test_mode_token_index_with_the_tiny_tokenizer(tiny_tokenizer):
    text = render_response(AutoThinkResponse("Small talk.", "think_off", "Hi!"))
    ids = encode_text(tiny_tokenizer, text[len("<judge>\n") :])  # what the engine generates
    i = mode_token_index(ids, tiny_tokenizer)
    assert i is not None and tiny_tokenizer.convert_ids_to_tokens(ids[i]) == "<think_off>"
    assert tiny_tokenizer.convert_ids_to_tokens(ids[: i + 1]).count("<think_off>") == 1
    on, off = tiny_tokenizer.convert_tokens_to_ids(["<think_on>", "<think_off>"])
    assert mode_token_index(ids, [on, off]) == i
    assert mode_token_index(ids[:i], tiny_tokenizer) is None
    assert mode_token_index([on, off], tiny_tokenizer) == 0


def test_group_advantages_fields():
    adv = compute_advantages([S("think_on", 1), S("think_off", 0)], AdvantageConfig())
    assert isinstance(adv, GroupAdvantages)
    # two rollouts, one each way: A = +-(0.5 / std) with unbiased std = sqrt(0.5)
    close(adv.a_answer, [1 / math.sqrt(2), -1 / math.sqrt(2)])
    assert adv.preferred_mode == "think_on" and adv.r_mode == [1.0, -1.0]
