"""Critic-free advantages per prompt group: GRPO and Step-SRPO (KAT_NOTES, "Step-SRPO").

`python -c "from kat_megatron.rl.advantages import *; from kat_megatron.rl.rewards import
RolloutScore as S; print(compute_advantages([S('think_off', 1, 1, 0, 1.2), S('think_on', 0, 1, 0,
0.2)], AdvantageConfig()))"`

For one prompt with G rollouts (docs/step_srpo.md has the full derivation):
- evidence: p_on, p_off = mean correctness of the group's rollouts (+ optional forced-mode
  probes, evidence only) in each mode; preferred mode m* = think_off if p_off >= p_on - delta
  else think_on; no preference (all r_mode = 0) when a mode has no evidence;
- r_mode_i = +1 if m_i == m* else -1 (a rollout without a mode token gets -1);
  r_ans_i = `RolloutScore.answer_reward`;
- per step, group-normalised: A = (r - b) / (std(r) + eps) (or r - b without `std_normalize`),
  b = mean(r), or the mean of the other G - 1 rewards with `leave_one_out`; std is the unbiased
  (Bessel-corrected, torch.std's default) standard deviation over the group, as in verl and TRL
  (`mode_normalize=False`: A_mode = r_mode, so a group that all chose one mode still learns
  from probe evidence);
- judge tokens (0..mode token, inclusive) get a_judge = mode_weight * A_mode + beta * A_ans,
  the rest a_answer = A_ans. GRPO is exactly mode_weight = 0, beta = 1 (`"grpo"`).
Departure from the GRPO paper: none for `"grpo"`; KAT-V1 gives no formulas for Step-SRPO, this is
the project's reconstruction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kat_megatron.data.autothink import MODE_TOKENS
from kat_megatron.rl.rewards import RolloutScore, mode_evidence, mode_rewards


@dataclass
class AdvantageConfig:
    """Which estimator and how rewards are normalised within a group."""

    estimator: str = "step_srpo"
    """A name in `ADVANTAGE_ESTIMATORS`: "step_srpo" or "grpo"."""
    std_normalize: bool = True
    """Divide by the group's std (+ eps); off = Dr. GRPO-style mean-centring only."""
    leave_one_out: bool = False
    """Baseline = mean of the other rollouts' rewards (RLOO) instead of the group mean."""
    mode_weight: float = 1.0
    """Weight of the step-1 (mode) advantage on judge tokens; 0 turns Step-SRPO into GRPO."""
    beta: float = 1.0
    """Weight of the answer advantage on judge tokens."""
    delta: float = 0.0
    """Tolerance for preferring think_off: think_off when p_off >= p_on - delta."""
    mode_normalize: bool = True
    """Group-normalise the mode reward like the answer reward (KAT_NOTES). Off: A_mode = r_mode
    (+1 / -1, already centred by design), so that a group whose rollouts all chose the wrong
    mode (preference from probes) still gets a signal; normalised, such a group gets 0."""
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"advantages.estimator={self.estimator!r}: unknown; "
                f"known: {sorted(ADVANTAGE_ESTIMATORS)}"
            )
        if self.eps <= 0:
            raise ValueError(f"advantages.eps={self.eps}: expected > 0")
        if not -1.0 <= self.delta <= 1.0:
            raise ValueError(f"advantages.delta={self.delta}: expected in [-1, 1]")


@dataclass
class GroupAdvantages:
    """Per-rollout advantages of one group (index i = rollout i) and the mode evidence."""

    a_judge: list[float]
    """Advantage of judge tokens (positions 0..mode token inclusive)."""
    a_answer: list[float]
    """Advantage of the remaining (reasoning and answer) tokens."""
    preferred_mode: str | None
    p_on: float | None
    p_off: float | None
    r_mode: list[float] = field(default_factory=list)
    """Step-1 rewards (+1 / -1 / 0), for metrics."""


def normalize_group(
    rewards: Sequence[float], std_normalize: bool, leave_one_out: bool, eps: float
) -> list[float]:
    """(r - baseline) / (std + eps) within one group; a group of one gets 0.

    Identical rewards give exact zeros: the float mean of equal values can be off by an ulp
    ([0.1] * 3: r - mean = -1.4e-17 each), which `has_signal`'s exact test would count as a
    signal and `/ (std + eps)` would turn into a spurious advantage."""
    r = torch.tensor(list(rewards), dtype=torch.float64)
    g = r.numel()
    if g < 2 or bool((r == r[0]).all()):
        return [0.0] * g
    baseline = (r.sum() - r) / (g - 1) if leave_one_out else r.mean()
    adv = r - baseline
    if std_normalize:
        adv = adv / (r.std(unbiased=True) + eps)
    return adv.tolist()


Estimator = Callable[[Sequence[RolloutScore], AdvantageConfig, Sequence[RolloutScore]], Any]
ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator: make `fn(scores, cfg, probes) -> GroupAdvantages` selectable by name."""

    def deco(fn: Estimator) -> Estimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return deco


def _step_advantages(
    scores: Sequence[RolloutScore],
    cfg: AdvantageConfig,
    probes: Sequence[RolloutScore],
    mode_weight: float,
    beta: float,
) -> GroupAdvantages:
    ev = mode_evidence(scores, probes, cfg.delta)
    r_mode = mode_rewards(scores, ev.preferred)
    norm = (cfg.std_normalize, cfg.leave_one_out, cfg.eps)
    a_mode = normalize_group(r_mode, *norm) if cfg.mode_normalize else list(r_mode)
    a_ans = normalize_group([s.answer_reward for s in scores], *norm)
    a_judge = [mode_weight * m + beta * a for m, a in zip(a_mode, a_ans)]
    return GroupAdvantages(a_judge, a_ans, ev.preferred, ev.p_on, ev.p_off, r_mode)


@register_estimator("step_srpo")
def step_srpo_advantages(
    scores: Sequence[RolloutScore], cfg: AdvantageConfig, probes: Sequence[RolloutScore] = ()
) -> GroupAdvantages:
    """Judge tokens: mode_weight * A_mode + beta * A_ans; other tokens: A_ans."""
    return _step_advantages(scores, cfg, probes, cfg.mode_weight, cfg.beta)


@register_estimator("grpo")
def grpo_advantages(
    scores: Sequence[RolloutScore], cfg: AdvantageConfig, probes: Sequence[RolloutScore] = ()
) -> GroupAdvantages:
    """Every token: A_ans (Step-SRPO with mode_weight = 0, beta = 1); the mode evidence is
    still reported for metrics."""
    return _step_advantages(scores, cfg, probes, 0.0, 1.0)


def compute_advantages(
    scores: list[RolloutScore], cfg: AdvantageConfig, probes: Sequence[RolloutScore] = ()
) -> GroupAdvantages:
    """Advantages of one prompt's group with `cfg.estimator`; `probes` are forced-mode rollouts
    used only as evidence for the preferred mode (never trained on)."""
    if not scores:
        raise ValueError("compute_advantages: empty group")
    return ADVANTAGE_ESTIMATORS[cfg.estimator](scores, cfg, probes)


def has_signal(adv: GroupAdvantages, tol: float = 0.0) -> bool:
    """False when every advantage of the group is 0 (within `tol`): dynamic sampling (DAPO)
    drops such groups, e.g. all rollouts with identical rewards and no mode preference.
    Exact by default: `normalize_group` returns exact zeros for identical rewards."""
    return any(abs(a) > tol for a in (*adv.a_judge, *adv.a_answer))


def token_advantages(
    a_judge: float, a_answer: float, mode_token_index: int | None, num_tokens: int
) -> torch.Tensor:
    """Per-token advantages `[num_tokens]` float32 of one rollout's generated tokens.

    Positions 0..mode_token_index (inclusive) get `a_judge`, the rest `a_answer`. A rollout
    without a mode token never left the judge step: all its tokens get `a_judge`.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens}: expected >= 0")
    out = torch.full((num_tokens,), float(a_answer), dtype=torch.float32)
    end = num_tokens if mode_token_index is None else min(mode_token_index + 1, num_tokens)
    out[:end] = float(a_judge)
    return out


def mode_token_ids(tokenizer_or_ids: Any) -> set[int]:
    """Ids of `<think_on>`/`<think_off>`: from a tokenizer (HF or our Megatron adapter), or an
    iterable of ids passed through."""
    if hasattr(tokenizer_or_ids, "convert_tokens_to_ids"):
        tok = tokenizer_or_ids
    elif hasattr(tokenizer_or_ids, "vocab") and isinstance(tokenizer_or_ids.vocab, dict):
        vocab = tokenizer_or_ids.vocab
        return {vocab[t] for t in MODE_TOKENS.values()}
    else:
        return {int(i) for i in tokenizer_or_ids}
    ids = {tok.convert_tokens_to_ids(t) for t in MODE_TOKENS.values()}
    if None in ids or getattr(tok, "unk_token_id", None) in ids:
        raise ValueError(f"tokenizer lacks the mode tokens {list(MODE_TOKENS.values())}")
    return ids


def mode_token_index(token_ids: list[int], tokenizer_or_ids: Any) -> int | None:
    """Position of the first mode token in a rollout's generated `token_ids`, or None."""
    ids = mode_token_ids(tokenizer_or_ids)
    return next((i for i, t in enumerate(token_ids) if t in ids), None)
