"""`kat data synthesize CONFIG.yaml [key=value ...]`: write think-on and think-off responses.

Think-on (multi-agent, as in the KAT-V1 report; prompts and the loop are ours): each round, the
`solver` answers (re-asked until its answer verifies, when the record has a reference), the
`thinker` writes the reasoning that leads to that answer (with the last critique, if any), and the
`critic` scores it 0-10 (`SCORE: N`); a score below `critic_threshold` starts another round, up to
`max_rounds`, then the record is rejected. Think-off: the `direct` teacher answers, rejection
sampled (up to `direct_samples` tries) until an answer verifies (the first non-empty answer when
there is no reference). With `sampling: prefill` the solver and the direct teacher are one
AutoThink model (`kat serve`) sampled through `/completions` with the mode forced after a judge,
by default the model's own (`prefill_judge: null`, as `kat data tag`), and the think text is its
own reasoning. The mode comes from the record (`mode`, written by `kat data tag`) or is
forced with `mode: think_on|think_off`. Model outputs containing special tokens are discarded and
counted (`events.malformed_outputs`). Rows carry `think` and `answer` for `kat data coldstart`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kat_megatron.data.autothink import MODES, find_tag
from kat_megatron.data.pipelines import prompts
from kat_megatron.data.pipelines.config import PipelineConfig, RoleConfig
from kat_megatron.data.pipelines.io import InputRecord
from kat_megatron.data.pipelines.runner import Outcome, PipelineContext, run_pipeline
from kat_megatron.data.pipelines.tag import sample_forced, sample_messages

MODE_SOURCES = ("from_record", *MODES)
SAMPLINGS = ("chat", "prefill")
_SCORE_RE = re.compile(r"SCORE\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def _reasoner(max_tokens: int = 16384) -> RoleConfig:
    return RoleConfig(model="deepseek-r1", temperature=0.6, max_tokens=max_tokens)


def _critic() -> RoleConfig:
    return RoleConfig(model="deepseek-v3", temperature=0.0, max_tokens=1024)


def _direct() -> RoleConfig:
    return RoleConfig(model="deepseek-v3", system_prompt=prompts.THINK_OFF_SYSTEM)


@dataclass
class SynthesizeConfig(PipelineConfig):
    """`kat data synthesize`: teacher roles and the regeneration limits."""

    mode: str = "from_record"
    """from_record (the record's `mode` field), think_on or think_off (all records)."""
    solver: RoleConfig = field(default_factory=_reasoner)
    thinker: RoleConfig | None = field(default_factory=_reasoner)
    """Writes the reasoning for the solver's verified answer; null: the solver's own reasoning
    (`reasoning_content`, e.g. an R1-style model or `kat serve` of an AutoThink model in
    think-on) is the think text."""
    critic: RoleConfig | None = field(default_factory=_critic)
    """Scores the reasoning 0-10; null: no critic (the verified answer is the only gate)."""
    direct: RoleConfig = field(default_factory=_direct)
    critic_threshold: float = 7.0
    """Minimum critic score (0-10) to keep a think-on response."""
    max_rounds: int = 3
    """Solver/thinker/critic rounds per think-on record."""
    direct_samples: int = 4
    """Rejection-sampling tries per think-off record."""
    answer_hints: bool = True
    """Append the verifier's answer-format hint to the solver's and direct teacher's prompt."""
    sampling: str = "chat"
    """chat: the solver and direct teacher get chat requests; prefill: they are one AutoThink
    model sampled through `/completions` with the mode prefilled after a judge (as `kat data
    tag sampling=prefill`); the think text is then the solver's own (needs `thinker: null`)."""
    prefill_judge: str | None = None
    """sampling=prefill: the judge text before the forced mode; null: the model's own, sampled
    first with the direct role's settings (one request per sample index)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODE_SOURCES:
            raise ValueError(f"mode={self.mode!r}: expected one of {list(MODE_SOURCES)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling={self.sampling!r}: expected one of {list(SAMPLINGS)}")
        if self.sampling == "prefill" and self.thinker is not None:
            raise ValueError(
                "sampling=prefill: expected thinker: null (the prefilled model's own reasoning "
                "is the think text)"
            )
        if not 0.0 <= self.critic_threshold <= 10.0:
            raise ValueError(f"critic_threshold={self.critic_threshold}: expected 0..10")
        for name in ("max_rounds", "direct_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")


def parse_score(text: str) -> float | None:
    """The critic's last `SCORE: N` (clipped to 0..10), or None."""
    found = _SCORE_RE.findall(text)
    return min(max(float(found[-1]), 0.0), 10.0) if found else None


def _clean(text: str) -> str | None:
    """Stripped text, or None when empty or holding a special token."""
    text = text.strip()
    return text if text and find_tag(text) is None else None


def _record_mode(cfg: SynthesizeConfig, rec: InputRecord) -> str:
    return rec.data.get("mode") if cfg.mode == "from_record" else cfg.mode


def _solve(
    ctx: PipelineContext,
    rec: InputRecord,
    role: RoleConfig,
    mode: str,
    i: int,
    tag: str,
    ev: Counter,
) -> tuple[str | None, str | None]:
    """(answer, the role's reasoning) from `role`; answer None when malformed or (with a
    reference) wrong."""
    cfg: SynthesizeConfig = ctx.cfg
    if cfg.sampling == "prefill":
        parsed, _ = sample_forced(ctx, rec, mode, role, i, tag, cfg.prefill_judge, cfg.direct)
        answer, reasoning = _clean(parsed.answer or ""), parsed.think
        if mode == "think_on" and not reasoning:
            answer = None  # no reasoning: counted as malformed below
    else:
        out = ctx.ask(role, sample_messages(rec, cfg.answer_hints), i, tag)
        answer, reasoning = _clean(out.text), out.reasoning
    if answer is None:
        ev["malformed_outputs"] += 1
    elif (
        rec.reference is not None and not ctx.verifier(rec.verifier)(answer, rec.reference).correct
    ):
        ev[f"{tag.split('/')[-1]}_wrong"] += 1
        answer = None
    return answer, reasoning


def _write_think(
    ctx: PipelineContext, rec: InputRecord, answer: str, reasoning: str | None, critique, r: int
) -> str | None:
    """The think text: the thinker's (with the last critique), or the solver's reasoning."""
    cfg: SynthesizeConfig = ctx.cfg
    if cfg.thinker is None:
        return _clean(reasoning or "")
    feedback = prompts.THINKER_FEEDBACK.format(critique=critique) if critique else ""
    ask = (cfg.thinker.prompt or prompts.THINKER_PROMPT).format(
        query=rec.query, answer=answer, feedback=feedback
    )
    out = ctx.ask(cfg.thinker, [{"role": "user", "content": ask}], r, "synthesize/thinker")
    return _clean(out.text or out.reasoning or "")


def _think_on(ctx: PipelineContext, rec: InputRecord) -> Outcome:
    cfg: SynthesizeConfig = ctx.cfg
    ev: Counter = Counter()
    answer = think = critique = reasoning = None
    scores: list[float | None] = []
    for r in range(cfg.max_rounds):
        if answer is None or cfg.thinker is None:
            answer, reasoning = _solve(ctx, rec, cfg.solver, "think_on", r, "synthesize/solver", ev)
            if answer is None:
                continue
        think = _write_think(ctx, rec, answer, reasoning, critique, r)
        if think is None:
            ev["malformed_outputs"] += 1
            continue
        if cfg.critic is None:
            return Outcome("kept", _row(ctx, rec, "think_on", think, answer, [], r + 1), None, ev)
        ask = (cfg.critic.prompt or prompts.CRITIC_PROMPT).format(
            query=rec.query, reasoning=think, answer=answer
        )
        out = ctx.ask(cfg.critic, [{"role": "user", "content": ask}], r, "synthesize/critic")
        score, critique = parse_score(out.text), out.text.strip()
        ev["critic_unparsed"] += score is None
        scores.append(score)
        if score is not None and score >= cfg.critic_threshold:
            return Outcome(
                "kept", _row(ctx, rec, "think_on", think, answer, scores, r + 1), None, ev
            )
    row = _row(ctx, rec, "think_on", think, answer, scores, cfg.max_rounds)
    if answer is None:
        reason = "no verified solver answer"
    elif think is None:
        reason = "no usable reasoning"
    else:
        reason = "critic score below threshold"
    return Outcome("rejected", row, reason, ev)


def _think_off(ctx: PipelineContext, rec: InputRecord) -> Outcome:
    cfg: SynthesizeConfig = ctx.cfg
    ev: Counter = Counter()
    for k in range(cfg.direct_samples):
        answer, _ = _solve(ctx, rec, cfg.direct, "think_off", k, "synthesize/direct", ev)
        if answer is not None:
            return Outcome("kept", _row(ctx, rec, "think_off", None, answer, [], k + 1), None, ev)
    row = _row(ctx, rec, "think_off", None, None, [], cfg.direct_samples)
    return Outcome("rejected", row, "no verified direct answer", ev)


def _row(
    ctx: PipelineContext,
    rec: InputRecord,
    mode: str,
    think: str | None,
    answer: str | None,
    scores: list[float | None],
    rounds: int,
) -> dict[str, Any]:
    length = ctx.meter((think or "") + (answer or ""))
    return {
        **rec.base_row(consumed=("mode", "think", "answer")),
        "mode": mode,
        "think": think,
        "answer": answer,
        "critic_scores": scores,
        "rounds": rounds,
        "length": length,
    }


def process_record(ctx: PipelineContext, rec: InputRecord) -> Outcome:
    mode = _record_mode(ctx.cfg, rec)
    return _think_on(ctx, rec) if mode == "think_on" else _think_off(ctx, rec)


def make_check(cfg: SynthesizeConfig) -> Callable[[InputRecord], None]:
    """An input check: a mode is known, and a reference (when given) suits its verifier."""
    from kat_megatron.verifiers import get_verifier

    def check(rec: InputRecord) -> None:
        if _record_mode(cfg, rec) not in MODES:
            raise ValueError(
                f"'mode' is {rec.data.get('mode')!r}, expected think_on or think_off "
                "(run kat data tag first, or set mode=think_on|think_off)"
            )
        if rec.reference is not None:
            get_verifier(rec.verifier).validate_reference(rec.reference)

    return check


def _lengths(row: dict[str, Any]) -> Iterable[tuple[str, int]]:
    yield row["mode"], row["length"]


def _extra(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rounds": dict(Counter(f"{r['mode']}:{r['rounds']}" for r in rows))}


def run_synthesize(cfg: SynthesizeConfig) -> dict[str, Any]:
    """Run `kat data synthesize`; return the summary (also written to OUTPUT/summary.json)."""
    return run_pipeline("synthesize", cfg, process_record, make_check(cfg), _lengths, _extra)
