"""Step-SRPO / GRPO rewards: per-rollout components in a registry, weighted by config.

`python -c "from kat_megatron.rl.rewards import *; print(score_rollout(
'Easy.\\n</judge>\\n\\n<think_off>\\n<answer>\\n4\\n</answer>', 12, 'stop',
{'verifier': 'math', 'reference': '4'}, RewardConfig()))"`

A rollout is the model's continuation after the generation prompt `...assistant\\n<judge>\\n`;
`GENERATION_PREFIX` is prepended before parsing. Components (`REWARD_COMPONENTS`, each
`fn(ctx, cfg) -> float`):
- `correctness`: the prompt's verifier (`meta["verifier"]`, `meta["reference"]`) on the
  leniently parsed answer: 1.0 / 0.0 (`partial_credit`: the verifier's score in [0, 1]);
- `format`: 1.0 when the strict parser accepts the text, else `-format_penalty` (default 0);
- `length`: DAPO's overlong shaping (Yu et al. 2025, eq. 13) as a non-positive reward:
  0 up to `max_new_tokens - overlong_buffer` tokens, then falling linearly to -1 at
  `max_new_tokens`; a truncated rollout (`finish_reason == "length"`) gets
  `-truncation_penalty` instead.
`answer_reward = sum_k weights[k] * component_k` is Step-SRPO's step-2 (answer) reward.

Internal failures (issue 17: never silently scored as 0 or 1). A component that cannot compute
its value for a reason that is not the rollout's fault raises `RewardError`; `score_rollout` then
returns a score with `error` set (the failed component and `answer_reward` are 0.0 placeholders)
and the trainer counts it and drops its group (docs/rl_trainer.md). For `correctness` that is a
`VerifyResult.error` (the sandbox could not start, the harness broke) or any exception the
verifier raises except two, which propagate and stop the run because no count can fix them:
`ValueError` (the verifiers' contract for an invalid reference or metadata: a data error) and
`SandboxUnavailable` (no safe sandbox on this machine: a set-up error). Any other exception from
a component is a bug in it and propagates too.

The step-1 (`mode`) reward is group-level: `mode_evidence` reads the group's pass rates per mode
(plus optional forced-mode probes) and `mode_rewards` gives +1 / -1 per rollout (see
`kat_megatron.rl.advantages` and docs/step_srpo.md). Its weight is `AdvantageConfig.mode_weight`,
not an entry of `RewardConfig.weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kat_megatron.data.autothink import GENERATION_PREFIX, MODES, LenientParse, parse_lenient
from kat_megatron.verifiers import Verifier, get_verifier
from kat_megatron.verifiers.sandbox import SandboxUnavailable


@dataclass
class RewardConfig:
    """Weights and shaping of the answer-step reward."""

    weights: dict[str, float] = field(
        default_factory=lambda: {"correctness": 1.0, "format": 0.2, "length": 0.0}
    )
    """Component name -> weight; every name must be in `REWARD_COMPONENTS`."""
    overlong_buffer: int = 0
    """DAPO's L_cache: tokens before `max_new_tokens` over which the length penalty ramps
    linearly from 0 to 1; 0 disables the soft penalty."""
    max_new_tokens: int = 1024
    """DAPO's L_max: the rollout engine's `max_new_tokens`."""
    truncation_penalty: float = 1.0
    """Penalty (>= 0) of the `length` component for a truncated rollout (finish 'length')."""
    format_penalty: float = 0.0
    """`format` component of a malformed rollout is `-format_penalty` (well-formed: 1)."""
    partial_credit: bool = False
    """`correctness` = the verifier's score in [0, 1] (e.g. fraction of unit tests passed)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(REWARD_COMPONENTS))
        if "mode" in unknown:
            raise ValueError(
                "rewards.weights: 'mode' is group-level; set its weight with "
                "advantages.mode_weight instead"
            )
        if unknown:
            raise ValueError(
                f"rewards.weights: unknown components {unknown}; known: {sorted(REWARD_COMPONENTS)}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"rewards.max_new_tokens={self.max_new_tokens}: expected >= 1")
        if not 0 <= self.overlong_buffer < self.max_new_tokens:
            raise ValueError(
                f"rewards.overlong_buffer={self.overlong_buffer}: expected in "
                f"[0, max_new_tokens={self.max_new_tokens})"
            )
        if self.truncation_penalty < 0 or self.format_penalty < 0:
            raise ValueError("rewards.truncation_penalty / format_penalty: expected >= 0")


@dataclass(frozen=True)
class RolloutContext:
    """What a component sees of one rollout."""

    text: str
    """`GENERATION_PREFIX + response_text`: the full answer as the parsers read it."""
    parsed: LenientParse
    num_tokens: int
    finish_reason: str
    meta: dict[str, Any]


@dataclass
class RolloutScore:
    """Rewards of one rollout. `components` holds every registered component's value."""

    mode: str | None
    """'think_on' / 'think_off' (the first mode token, or the forced mode); None if none."""
    correct: float
    format_ok: float
    """1.0 when the strict parser accepts the rollout, else 0.0."""
    length_penalty: float
    """Magnitude (>= 0) of the length shaping: the `length` component is `-length_penalty`."""
    answer_reward: float
    """Weighted sum of the components: Step-SRPO's step-2 reward r_ans."""
    components: dict[str, float] = field(default_factory=dict)
    forced: bool = False
    """A forced-mode rollout (mode prefilled): evidence for the mode reward only."""
    error: str | None = None
    """Set when a component failed for an internal reason (`RewardError`, e.g. the code
    sandbox could not run): `correct` / `answer_reward` are then 0.0 placeholders, not a
    judgement; never train on it or count it as evidence."""


class RewardError(Exception):
    """A reward component could not compute its value for an internal reason (verifier
    machinery, sandbox, harness): `score_rollout` records it as `RolloutScore.error`."""


RewardComponent = Callable[[RolloutContext, RewardConfig], float]
REWARD_COMPONENTS: dict[str, RewardComponent] = {}
"""Component name -> `fn(ctx, cfg) -> float`; `fn` raises `RewardError` for an internal failure."""


def register_reward(name: str) -> Callable[[RewardComponent], RewardComponent]:
    """Decorator: make `fn(ctx, cfg) -> float` a component selectable in `weights`."""

    def deco(fn: RewardComponent) -> RewardComponent:
        if name in REWARD_COMPONENTS:
            raise ValueError(f"reward component {name!r} is already registered")
        REWARD_COMPONENTS[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardComponent:
    if name not in REWARD_COMPONENTS:
        raise ValueError(f"unknown reward component {name!r}; known: {sorted(REWARD_COMPONENTS)}")
    return REWARD_COMPONENTS[name]


_VERIFIERS: dict[str, Verifier] = {}


def _verifier(name: str) -> Verifier:
    if name not in _VERIFIERS:
        _VERIFIERS[name] = get_verifier(name)
    return _VERIFIERS[name]


@register_reward("correctness")
def correctness_reward(ctx: RolloutContext, cfg: RewardConfig) -> float:
    """The prompt's verifier on the leniently parsed answer (0/1, or its score). `RewardError`
    when the verifier reports an internal `error` or raises (except `ValueError`, an invalid
    reference, and `SandboxUnavailable`, which propagate: see the module doc)."""
    if "verifier" not in ctx.meta or "reference" not in ctx.meta:
        raise ValueError(f"prompt metadata needs 'verifier' and 'reference'; got {ctx.meta}")
    if not ctx.parsed.answer:
        return 0.0
    name = ctx.meta["verifier"]
    verifier = _verifier(name)  # an unknown name is a ValueError (data)
    try:
        result = verifier(ctx.parsed.answer, ctx.meta["reference"])
    except (ValueError, SandboxUnavailable):
        raise
    except Exception as err:
        raise RewardError(f"verifier {name!r} raised {type(err).__name__}: {err}") from err
    if result.error is not None:
        raise RewardError(f"verifier {name!r}: {result.error}")
    return float(result.score) if cfg.partial_credit else float(result.correct)


@register_reward("format")
def format_reward(ctx: RolloutContext, cfg: RewardConfig) -> float:
    """1 if the strict parser accepts the rollout, else -format_penalty."""
    return 1.0 if ctx.parsed.well_formed else -cfg.format_penalty


def length_penalty(num_tokens: int, finish_reason: str, cfg: RewardConfig) -> float:
    """Magnitude of DAPO's overlong penalty: max(0, (n - (L_max - L_cache)) / L_cache), capped
    at 1; `truncation_penalty` for a truncated rollout."""
    if finish_reason == "length":
        return cfg.truncation_penalty
    if cfg.overlong_buffer == 0:
        return 0.0
    start = cfg.max_new_tokens - cfg.overlong_buffer
    return min(1.0, max(0.0, (num_tokens - start) / cfg.overlong_buffer))


@register_reward("length")
def length_reward(ctx: RolloutContext, cfg: RewardConfig) -> float:
    return -length_penalty(ctx.num_tokens, ctx.finish_reason, cfg)


def score_rollout(
    response_text: str,
    num_tokens: int,
    finish_reason: str,
    meta: dict,
    cfg: RewardConfig,
    forced_mode: str | None = None,
) -> RolloutScore:
    """Score one rollout. `response_text` is the continuation after the generation prompt; for a
    forced-mode rollout pass `forced_mode_prefix(mode) + continuation` and `forced_mode=mode`.
    A component's `RewardError` gives a score with `error` = "<component>: <message>" (the first
    one), that component and `answer_reward` 0.0 placeholders; other exceptions propagate."""
    if forced_mode is not None and forced_mode not in MODES:
        raise ValueError(f"forced_mode: expected one of {MODES} or None, got {forced_mode!r}")
    text = GENERATION_PREFIX + response_text
    ctx = RolloutContext(text, parse_lenient(text), num_tokens, finish_reason, dict(meta))
    components: dict[str, float] = {}
    errors: list[str] = []
    for name, fn in REWARD_COMPONENTS.items():
        try:
            components[name] = float(fn(ctx, cfg))
        except RewardError as err:
            components[name] = 0.0  # placeholder: the score carries `error`
            errors.append(f"{name}: {err}")
    answer_reward = 0.0 if errors else sum(w * components[n] for n, w in cfg.weights.items())
    return RolloutScore(
        mode=forced_mode or ctx.parsed.mode,
        correct=components["correctness"],
        format_ok=1.0 if ctx.parsed.well_formed else 0.0,
        length_penalty=-components["length"],
        answer_reward=float(answer_reward),
        components=components,
        forced=forced_mode is not None,
        error=errors[0] if errors else None,
    )


def score_group(
    responses: list[tuple[str, int, str]], meta: dict, cfg: RewardConfig
) -> list[RolloutScore]:
    """`score_rollout` for each `(response_text, num_tokens, finish_reason)` of one prompt."""
    return [score_rollout(text, n, finish, meta, cfg) for text, n, finish in responses]


@dataclass(frozen=True)
class ModeEvidence:
    """Pass rates per mode in a group (None: no rollout in that mode) and the preferred mode."""

    p_on: float | None
    p_off: float | None
    preferred: str | None
    """think_off if p_off >= p_on - delta else think_on; None when a mode has no evidence."""


def mode_evidence(
    scores: Sequence[RolloutScore], probes: Sequence[RolloutScore] = (), delta: float = 0.0
) -> ModeEvidence:
    """Mean correctness per mode over the group's rollouts plus the probes (evidence only);
    scores with an `error` are no evidence and are left out."""
    rates: dict[str, float | None] = {}
    for mode in MODES:
        got = [s.correct for s in (*scores, *probes) if s.mode == mode and s.error is None]
        rates[mode] = sum(got) / len(got) if got else None
    p_on, p_off = rates["think_on"], rates["think_off"]
    if p_on is None or p_off is None:
        return ModeEvidence(p_on, p_off, None)
    return ModeEvidence(p_on, p_off, "think_off" if p_off >= p_on - delta else "think_on")


def mode_rewards(scores: Sequence[RolloutScore], preferred: str | None) -> list[float]:
    """Step-1 reward: +1 if the rollout chose `preferred`, -1 otherwise (no mode token
    included); all 0 when there is no preference."""
    if preferred is None:
        return [0.0] * len(scores)
    return [1.0 if s.mode == preferred else -1.0 for s in scores]
