"""`kat data tag CONFIG.yaml [key=value ...]`: label each query think-on or think-off.

For every query, sample `samples_per_mode` answers in each forced mode, verify them against the
reference, and compare the pass rates (KAT_NOTES "Cold start", our reconstruction):

    think_off  if  p_off - p_on + margin + judge_weight * v >= 0  else  think_on

where v is the optional LLM-judge vote (+1 think-off, -1 think-on, 0 none/unparsed); without a
judge this is "p_off >= p_on - margin", ties going to think-off, the cheaper mode. Forced modes
are sampled either from two teachers (`sampling: teacher`: `think_on` is a reasoning model such as
DeepSeek-R1, `think_off` a direct one such as DeepSeek-V3 with a no-reasoning system prompt) or
from an AutoThink model through `/completions` with the mode prefilled (`sampling: prefill`,
system prompts ignored). The judge text before the forced mode is `prefill_judge`, a fixed text,
or with `prefill_judge: null` the model's own: sample i first asks for the judge alone (stopped
at `</judge>`, at most 32 tokens, the think_off role's sampling and seed i, one cached request
shared by both modes), then forces each mode after it, as `kat eval --forced-judge model`
does. A small model that always writes its judge before choosing can be out of distribution
after a judge text it never wrote (the demo's tiny teacher: hard think_on 0.34 after the fixed
text, 1.00 after its own; docs/autothink_data.md). Rows keep the votes, pass rates, judge vote and sample lengths.

Oracle (`oracle: {samples_per_mode: 16}`): how right the labels are, measured. Each query is
also sampled `oracle.samples_per_mode` more times per forced mode from the same teacher (other
seeds; `oracle.temperature` overrides the roles', 0 = greedy with one sample per mode), and the
oracle label is the mode with the higher oracle pass rate, think-off on ties (the cheaper mode).
Rows get `oracle` {mode, p_on, p_off}; summary.json gets `oracle_agreement`: the fraction of
labels equal to the oracle's, overall and per category (`category` of the input records), and
the confusion counts. The oracle's requests are extra cost (2 x samples_per_mode per query).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kat_megatron.data.autothink import (
    ANSWER_OPEN,
    GENERATION_PREFIX,
    JUDGE_CLOSE,
    MODE_TOKENS,
    MODES,
    THINK_OPEN,
    LenientParse,
    parse_lenient,
)
from kat_megatron.data.chat_template import render_chat
from kat_megatron.data.pipelines import prompts
from kat_megatron.data.pipelines.config import PipelineConfig, RoleConfig
from kat_megatron.data.pipelines.io import InputRecord
from kat_megatron.data.pipelines.runner import Outcome, PipelineContext, run_pipeline


def _think_on_role() -> RoleConfig:
    return RoleConfig(model="deepseek-r1", temperature=0.6, max_tokens=16384)


def _think_off_role() -> RoleConfig:
    return RoleConfig(model="deepseek-v3", system_prompt=prompts.THINK_OFF_SYSTEM)


@dataclass
class OracleConfig:
    """Many forced-mode samples per query whose majority is the reference label."""

    samples_per_mode: int = 16
    temperature: float | None = None
    """None: each mode role's own temperature; 0: greedy (one sample per mode suffices)."""

    def __post_init__(self) -> None:
        if self.samples_per_mode < 1:
            raise ValueError(f"oracle.samples_per_mode={self.samples_per_mode}: expected >= 1")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"oracle.temperature={self.temperature}: expected 0..2")


ORACLE_INDEX = 1_000_000
"""Oracle sample j uses request index ORACLE_INDEX + j (seeds apart from the tagging samples')."""


@dataclass
class TagConfig(PipelineConfig):
    """`kat data tag`: forced-mode sampling, verification and the mode decision."""

    samples_per_mode: int = 4
    """N answers sampled in each forced mode."""
    margin: float = 0.0
    """delta: think-off wins while p_off >= p_on - margin."""
    sampling: str = "teacher"
    """How forced modes are sampled: a key of `SAMPLERS` (teacher, prefill)."""
    think_on: RoleConfig = field(default_factory=_think_on_role)
    think_off: RoleConfig = field(default_factory=_think_off_role)
    judge: RoleConfig | None = None
    """Optional LLM judge asked THINK_ON/THINK_OFF; its vote weighs `judge_weight`."""
    judge_weight: float = 0.25
    prefill_judge: str | None = "I will decide how to answer this query."
    """Judge text written before the forced mode token (sampling=prefill); null: the model's
    own judge, generated first (module docstring)."""
    answer_hints: bool = True
    """Append the verifier's answer-format hint (prompts.ANSWER_HINTS) to sampled queries."""
    drop_unsolved: bool = False
    """Reject queries that no sample answered correctly (kept and flagged `unsolved` if false)."""
    oracle: OracleConfig | None = None
    """Measure the labels against an oracle of many more samples (see the module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples_per_mode < 1:
            raise ValueError(f"samples_per_mode={self.samples_per_mode}: expected >= 1")
        if self.sampling not in SAMPLERS:
            raise ValueError(f"unknown sampling {self.sampling!r}; known: {sorted(SAMPLERS)}")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"margin={self.margin}: expected 0..1")
        if self.judge_weight < 0:
            raise ValueError(f"judge_weight={self.judge_weight}: expected >= 0")


def decide_mode(
    p_on: float, p_off: float, margin: float, judge_vote: str | None = None, weight: float = 0.0
) -> str:
    """think_off when p_off - p_on + margin + weight * vote >= 0 (ties to think-off)."""
    vote = {"think_off": 1.0, "think_on": -1.0}.get(judge_vote or "", 0.0)
    return "think_off" if p_off - p_on + margin + weight * vote >= -1e-9 else "think_on"


def sample_messages(rec: InputRecord, hints: bool) -> list[dict[str, str]]:
    """The record's prompt with the verifier's answer-format hint appended to the last turn."""
    hint = prompts.ANSWER_HINTS.get(rec.verifier, "") if hints else ""
    if not hint:
        return rec.messages
    last = prompts.SAMPLE_PROMPT.format(query=rec.query, hint=hint)
    return [*rec.messages[:-1], {"role": "user", "content": last}]


def _role(ctx: PipelineContext, mode: str, oracle: bool) -> RoleConfig:
    role = getattr(ctx.cfg, mode)
    temp = ctx.cfg.oracle.temperature if oracle else None
    return role if temp is None else dataclasses.replace(role, temperature=temp)


def _sample_teacher(
    ctx: PipelineContext, rec: InputRecord, mode: str, i: int, oracle: bool = False
) -> tuple[str, int]:
    tag = f"tag/{'oracle/' if oracle else ''}{mode}"
    out = ctx.ask(_role(ctx, mode, oracle), sample_messages(rec, ctx.cfg.answer_hints), i, tag)
    return out.text, ctx.meter((out.reasoning or "") + out.text)


OWN_JUDGE_TOKENS = 32
"""At most this many tokens of the model's own judge (`prefill_judge: null`)."""


def own_judge(ctx: PipelineContext, role: RoleConfig, prompt: str, i: int, tag: str) -> str:
    """The model's judge text for sample `i`: one request with `role`'s sampling, stopped at
    `</judge>` (cached under `tag`, so the two modes of one sample index share it)."""
    role = dataclasses.replace(role, max_tokens=OWN_JUDGE_TOKENS)
    out = ctx.complete(role, prompt, i, tag, stop=[JUDGE_CLOSE])
    return out.text.split(JUDGE_CLOSE, 1)[0].strip()


def sample_forced(
    ctx: PipelineContext,
    rec: InputRecord,
    mode: str,
    role: RoleConfig,
    i: int,
    tag: str,
    judge: str | None,
    judge_role: RoleConfig,
) -> tuple[LenientParse, str]:
    """One `/completions` sample of an AutoThink model with `mode` forced: the chat template's
    generation prompt, the judge (`judge`, or with None the model's own, from `judge_role`,
    cached as `{tag}/judge`), the mode token and its opener prefilled. Returns the parse of the
    whole assistant turn and the generated text."""
    opener = THINK_OPEN if mode == "think_on" else ANSWER_OPEN
    prompt = render_chat(sample_messages(rec, ctx.cfg.answer_hints), add_generation_prompt=True)
    if judge is None:
        judge = own_judge(ctx, judge_role, prompt, i, f"{tag}/judge")
    prefix = f"{judge}\n{JUDGE_CLOSE}\n\n{MODE_TOKENS[mode]}\n{opener}\n"
    out = ctx.complete(role, prompt + prefix, i, f"{tag}/{mode}")
    return parse_lenient(GENERATION_PREFIX + prefix + out.text), out.text


def _sample_prefill(
    ctx: PipelineContext, rec: InputRecord, mode: str, i: int, oracle: bool = False
) -> tuple[str, int]:
    tag = "tag/oracle" if oracle else "tag"
    parsed, text = sample_forced(
        ctx,
        rec,
        mode,
        _role(ctx, mode, oracle),
        i,
        tag,
        ctx.cfg.prefill_judge,
        _role(ctx, "think_off", oracle),
    )
    return parsed.answer, ctx.meter(text)


SAMPLERS: dict[str, Callable[..., tuple[str, int]]] = {
    "teacher": _sample_teacher,
    "prefill": _sample_prefill,
}
"""Forced-mode samplers by name: (context, record, mode, sample index, oracle=False) ->
(answer, length); `oracle` selects the oracle's role temperature and cache tag."""


def oracle_label(ctx: PipelineContext, rec: InputRecord, verifier) -> dict[str, Any]:
    """The oracle's pass rates and mode for one query (greedy: one sample per mode)."""
    o = ctx.cfg.oracle
    n = 1 if o.temperature == 0 else o.samples_per_mode
    rates = {}
    for mode in MODES:
        ok = 0
        for j in range(n):
            answer, _ = SAMPLERS[ctx.cfg.sampling](ctx, rec, mode, ORACLE_INDEX + j, oracle=True)
            ok += int(verifier(answer, rec.reference).correct)
        rates[mode] = ok / n
    mode = decide_mode(rates["think_on"], rates["think_off"], 0.0)
    return {"mode": mode, "p_on": rates["think_on"], "p_off": rates["think_off"], "samples": n}


_VOTE_RE = re.compile(r"think[\s_-]*(on|off)", re.IGNORECASE)


def judge_vote(ctx: PipelineContext, rec: InputRecord) -> str | None:
    """The LLM judge's mode (its last THINK_ON/THINK_OFF), or None when it names neither."""
    role = ctx.cfg.judge
    text = (role.prompt or prompts.JUDGE_VOTE_PROMPT).format(query=rec.query)
    out = ctx.ask(role, [{"role": "user", "content": text}], 0, "tag/judge")
    found = _VOTE_RE.findall(out.text)
    return f"think_{found[-1].lower()}" if found else None


def process_record(ctx: PipelineContext, rec: InputRecord) -> Outcome:
    cfg: TagConfig = ctx.cfg
    verifier = ctx.verifier(rec.verifier)
    votes: dict[str, list[int]] = {}
    lengths: dict[str, list[int]] = {}
    for mode in MODES:
        votes[mode], lengths[mode] = [], []
        for i in range(cfg.samples_per_mode):
            answer, n = SAMPLERS[cfg.sampling](ctx, rec, mode, i)
            votes[mode].append(int(verifier(answer, rec.reference).correct))
            lengths[mode].append(n)
    p_on = sum(votes["think_on"]) / cfg.samples_per_mode
    p_off = sum(votes["think_off"]) / cfg.samples_per_mode
    events: Counter = Counter()
    vote = judge_vote(ctx, rec) if cfg.judge is not None else None
    if cfg.judge is not None and vote is None:
        events["judge_unparsed"] += 1
    weight = cfg.judge_weight if cfg.judge is not None else 0.0
    row = {
        **rec.base_row(),
        "mode": decide_mode(p_on, p_off, cfg.margin, vote, weight),
        "p_on": p_on,
        "p_off": p_off,
        "votes": votes,
        "judge_vote": vote,
        "unsolved": p_on == 0 and p_off == 0,
        "sample_lengths": lengths,
    }
    if cfg.oracle is not None:
        row["oracle"] = oracle_label(ctx, rec, verifier)
        row["category"] = str(rec.data.get("category", "default"))
    if row["unsolved"] and cfg.drop_unsolved:
        return Outcome("rejected", row, "unsolved: no sample was verified correct", events)
    return Outcome("kept", row, None, events)


def make_reference_check() -> Callable[[InputRecord], None]:
    """An input check: the record has a reference its verifier accepts."""
    from kat_megatron.verifiers import get_verifier

    built: dict[str, Any] = {}

    def check(rec: InputRecord) -> None:
        if rec.reference is None:
            raise ValueError("missing 'reference' (sampled answers are verified against it)")
        if rec.verifier not in built:
            built[rec.verifier] = get_verifier(rec.verifier)
        built[rec.verifier].validate_reference(rec.reference)

    return check


def _lengths(row: dict[str, Any]) -> Iterable[tuple[str, int]]:
    for mode, values in row["sample_lengths"].items():
        for n in values:
            yield mode, n


def _extra(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows) or 1
    return {
        "unsolved": sum(bool(r["unsolved"]) for r in rows),
        "mean_pass_rate": {
            "think_on": round(sum(r["p_on"] for r in rows) / n, 4),
            "think_off": round(sum(r["p_off"] for r in rows) / n, 4),
        },
        "judge_votes": dict(Counter(str(r["judge_vote"]) for r in rows if r["judge_vote"])),
        **({"oracle_agreement": oracle_agreement(rows)} if rows and "oracle" in rows[0] else {}),
    }


def oracle_agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement of the labels with the oracle's: overall, per category, and confusion counts
    `label->oracle`."""

    def rate(rs: list[dict[str, Any]]) -> float:
        return round(sum(r["mode"] == r["oracle"]["mode"] for r in rs) / len(rs), 4)

    cats = sorted({r.get("category", "default") for r in rows})
    return {
        "overall": rate(rows),
        "by_category": {
            c: rate([r for r in rows if r.get("category", "default") == c]) for c in cats
        },
        "confusion": dict(Counter(f"{r['mode']}->{r['oracle']['mode']}" for r in rows)),
        "oracle_think_on_rate": round(
            sum(r["oracle"]["mode"] == "think_on" for r in rows) / len(rows), 4
        ),
        "n": len(rows),
    }


def run_tag(cfg: TagConfig) -> dict[str, Any]:
    """Run `kat data tag`; return the summary (also written to OUTPUT/summary.json)."""
    return run_pipeline("tag", cfg, process_record, make_reference_check(), _lengths, _extra)
