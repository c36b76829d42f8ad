"""Rewards: components against hand-computed values, weights, DAPO length shaping, mode evidence."""

from __future__ import annotations

import pytest

from kat_megatron.data.autothink import (
    GENERATION_PREFIX,
    AutoThinkResponse,
    forced_mode_prefix,
    render_response,
)
from kat_megatron.rl.rewards import (
    REWARD_COMPONENTS,
    RewardConfig,
    RolloutScore,
    get_reward,
    length_penalty,
    mode_evidence,
    mode_rewards,
    register_reward,
    score_group,
    score_rollout,
)

MATH = {"verifier": "math", "reference": "4", "category": "math"}


def completion(mode: str, answer: str, think: str | None = None) -> str:
    """A canonical answer minus the `<judge>\\n` the generation prompt already holds."""
    text = render_response(AutoThinkResponse("Simple sum.", mode, answer, think))
    assert text.startswith(GENERATION_PREFIX)
    return text[len(GENERATION_PREFIX) :]


def test_well_formed_correct_rollout():
    s = score_rollout(completion("think_off", "\\boxed{4}"), 20, "stop", MATH, RewardConfig())
    # correctness 1, format 1, length 0 -> 1.0 * 1 + 0.2 * 1 + 0.0 * 0 = 1.2
    assert (s.mode, s.correct, s.format_ok, s.length_penalty) == ("think_off", 1.0, 1.0, 0.0)
    assert s.answer_reward == pytest.approx(1.2, abs=1e-12)  # float sum of two terms
    assert set(s.components) == set(REWARD_COMPONENTS) and not s.forced
    # the end-of-turn token the engine keeps is accepted by the strict parser
    s = score_rollout(completion("think_on", "4", "2+2") + "<|im_end|>", 30, "stop", MATH,
                      RewardConfig())  # fmt: skip
    assert (s.mode, s.correct, s.format_ok) == ("think_on", 1.0, 1.0)


def test_malformed_but_correct_and_wrong_answers():
    # no </answer>: the lenient parser still finds "4" (correct), the strict one rejects it
    text = "Sum.\n</judge>\n\n<think_off>\n<answer>\n4"
    cfg = RewardConfig(format_penalty=0.5)
    s = score_rollout(text, 10, "stop", MATH, cfg)
    assert (s.mode, s.correct, s.format_ok) == ("think_off", 1.0, 0.0)
    assert s.components["format"] == -0.5
    assert s.answer_reward == pytest.approx(1.0 - 0.2 * 0.5, abs=1e-12)
    s = score_rollout(completion("think_off", "5"), 10, "stop", MATH, RewardConfig())
    assert (s.correct, s.format_ok, s.answer_reward) == (0.0, 1.0, pytest.approx(0.2))
    # no mode token at all: mode None; the answer is what follows </judge>
    s = score_rollout("Sum.\n</judge>\n4", 5, "stop", MATH, RewardConfig())
    assert (s.mode, s.correct, s.format_ok) == (None, 1.0, 0.0)
    s = score_rollout("", 0, "length", MATH, RewardConfig())
    assert (s.mode, s.correct, s.format_ok, s.length_penalty) == (None, 0.0, 0.0, 1.0)


@pytest.mark.parametrize(
    "num_tokens,finish,expected",
    [
        # L_max = 100, L_cache = 20: no penalty up to 80 tokens, then (n - 80) / 20
        (50, "stop", 0.0),
        (80, "stop", 0.0),
        (90, "stop", 0.5),
        (95, "stop", 0.75),
        (100, "stop", 1.0),
        (100, "length", 1.5),  # truncated: truncation_penalty replaces the ramp
        (10, "length", 1.5),
    ],
)
def test_dapo_overlong_shaping(num_tokens, finish, expected):
    cfg = RewardConfig(max_new_tokens=100, overlong_buffer=20, truncation_penalty=1.5)
    assert length_penalty(num_tokens, finish, cfg) == pytest.approx(expected, abs=1e-12)
    cfg.weights = {"correctness": 1.0, "format": 0.2, "length": 0.5}
    s = score_rollout(completion("think_off", "4"), num_tokens, finish, MATH, cfg)
    # a truncated rollout is still parsed for correctness here (the text itself is complete)
    assert s.length_penalty == pytest.approx(expected, abs=1e-12)
    assert s.answer_reward == pytest.approx(1.0 + 0.2 - 0.5 * expected, abs=1e-12)


def test_no_overlong_buffer_only_truncation_counts():
    cfg = RewardConfig(max_new_tokens=100, overlong_buffer=0)
    assert length_penalty(100, "stop", cfg) == 0.0
    assert length_penalty(100, "length", cfg) == 1.0


def test_partial_credit_with_code_verifier():
    meta = {"verifier": "code", "reference": {"tests": ["assert f(1) == 2", "assert f(2) == 5"]}}
    text = completion("think_off", "```python\ndef f(x):\n    return 2 * x\n```")
    # one of the two unit tests passes
    assert score_rollout(text, 30, "stop", meta, RewardConfig()).correct == 0.0
    s = score_rollout(text, 30, "stop", meta, RewardConfig(partial_credit=True))
    assert s.correct == 0.5 and s.answer_reward == pytest.approx(0.5 + 0.2)


def test_score_group_and_forced_mode():
    meta = {"verifier": "exact_match", "reference": "Paris"}
    got = score_group(
        [(completion("think_off", "Paris"), 12, "stop"), (completion("think_on", "Rome", "hm"), 20,
         "stop"), ("Paris", 3, "length")], meta, RewardConfig())  # fmt: skip
    assert [(s.mode, s.correct, s.format_ok) for s in got] == [
        ("think_off", 1.0, 1.0), ("think_on", 0.0, 1.0), (None, 1.0, 0.0)
    ]  # fmt: skip
    probe = forced_mode_prefix("think_off") + "Paris\n</answer>"
    s = score_rollout(probe, 5, "stop", meta, RewardConfig(), forced_mode="think_off")
    assert (s.mode, s.forced, s.correct, s.format_ok) == ("think_off", True, 1.0, 1.0)
    with pytest.raises(ValueError, match="forced_mode"):
        score_rollout(probe, 5, "stop", meta, RewardConfig(), forced_mode="on")
    with pytest.raises(ValueError, match="'verifier' and 'reference'"):
        score_rollout(probe, 5, "stop", {"reference": "x"}, RewardConfig())


def test_config_validation_and_registry():
    with pytest.raises(ValueError, match=r"unknown components \['lenght'\]; known: \["):
        RewardConfig(weights={"lenght": 1.0})
    with pytest.raises(ValueError, match="advantages.mode_weight"):
        RewardConfig(weights={"mode": 1.0})
    with pytest.raises(ValueError, match="overlong_buffer"):
        RewardConfig(max_new_tokens=10, overlong_buffer=10)
    with pytest.raises(ValueError, match="unknown reward component 'x'; known: \\['correctness'"):
        get_reward("x")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("format")(lambda ctx, cfg: 0.0)
    register_reward("answer_chars")(lambda ctx, cfg: float(len(ctx.parsed.answer)))
    try:
        cfg = RewardConfig(weights={"correctness": 1.0, "answer_chars": 0.1})
        s = score_rollout(completion("think_off", "4444"), 9, "stop", MATH, cfg)
        assert s.components["answer_chars"] == 4.0 and s.answer_reward == pytest.approx(0.4)
    finally:
        del REWARD_COMPONENTS["answer_chars"]


def _s(mode, correct):
    return RolloutScore(mode, correct, 1.0, 0.0, correct)


def test_mode_evidence_and_rewards():
    group = [_s("think_on", 1), _s("think_on", 0), _s("think_off", 1), _s(None, 1)]
    ev = mode_evidence(group)  # p_on = 1/2, p_off = 1/1; 1 >= 0.5 - 0 -> think_off
    assert (ev.p_on, ev.p_off, ev.preferred) == (0.5, 1.0, "think_off")
    assert mode_rewards(group, ev.preferred) == [-1.0, -1.0, 1.0, -1.0]  # no mode token: -1
    # ties go to think_off; delta widens that: p_off = 0.5 >= p_on - 0.3 = 0.7? no -> think_on
    group = [_s("think_on", 1), _s("think_off", 1), _s("think_off", 0)]
    assert mode_evidence(group, delta=0.5).preferred == "think_off"  # 0.5 >= 1 - 0.5
    assert mode_evidence(group, delta=0.3).preferred == "think_on"
    assert mode_evidence([_s("think_on", 1), _s("think_off", 1)]).preferred == "think_off"
    # one mode missing: no preference, all-zero mode reward; probes supply the evidence
    only_on = [_s("think_on", 1), _s("think_on", 0)]
    ev = mode_evidence(only_on)
    assert (ev.p_on, ev.p_off, ev.preferred) == (0.5, None, None)
    assert mode_rewards(only_on, None) == [0.0, 0.0]
    probes = [_s("think_off", 1), _s("think_off", 0), _s("think_off", 0)]
    ev = mode_evidence(only_on, probes)  # p_off = 1/3 < 0.5 -> think_on
    assert (ev.p_on, ev.p_off, ev.preferred) == (0.5, pytest.approx(1 / 3), "think_on")
