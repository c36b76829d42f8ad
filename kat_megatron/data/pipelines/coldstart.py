"""`kat data coldstart CONFIG.yaml [key=value ...]`: build AutoThink SFT examples.

Input: records with `mode`, `answer` and (think-on) `think`, e.g. `kat data synthesize`'s
data.jsonl. A record without `mode` but with pass rates (`p_on`, `p_off`) gets the majority-vote
mode of `kat data tag` (`margin`). The query's intent is the record's `intent` when it is one of
`intents`, else the `intent_classifier`'s answer (else "other"). The `judge_writer` writes the
judge text from the query, its intent and the mode (KAT_NOTES: "intent-aware prompting"); judge
texts that are empty or contain special tokens are regenerated up to `max_attempts` times. Each
example is `messages` = the prompt turns + the rendered AutoThink answer (checked with the strict
parser), ready for `packing.tokenize_chat`. The summary reports the mode mix overall and per
intent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kat_megatron.data.autothink import (
    MODES,
    AutoThinkResponse,
    find_tag,
    parse_strict,
    render_response,
)
from kat_megatron.data.pipelines import prompts
from kat_megatron.data.pipelines.config import PipelineConfig, RoleConfig
from kat_megatron.data.pipelines.io import InputRecord
from kat_megatron.data.pipelines.runner import Outcome, PipelineContext, run_pipeline
from kat_megatron.data.pipelines.tag import decide_mode

DEFAULT_INTENTS = ["chit-chat", "factual", "math", "code", "reasoning", "writing", "other"]


def _writer() -> RoleConfig:
    return RoleConfig(model="deepseek-v3", temperature=0.7, max_tokens=512)


@dataclass
class ColdstartConfig(PipelineConfig):
    """`kat data coldstart`: judge writing and intent classes."""

    judge_writer: RoleConfig | None = field(default_factory=_writer)
    """Writes the judge text; null: `judge_template` filled with the intent and decision."""
    judge_template: str = "This is a {intent} query that {why}, so I will {decision}."
    """Judge text when `judge_writer` is null. Fields: intent, decision, why."""
    judge_templates: dict[str, str] = field(default_factory=dict)
    """Per-mode judge templates (`{think_on: ..., think_off: ...}`, same fields) used instead of
    `judge_template` for the modes listed, when `judge_writer` is null: e.g. the short judge
    texts a tiny model saw in pretraining (a long unseen text makes SFT rewrite the model)."""
    intent_classifier: RoleConfig | None = None
    """Model that names the intent of records without one; None: such records get "other"."""
    intents: list[str] = field(default_factory=lambda: list(DEFAULT_INTENTS))
    margin: float = 0.0
    """For records with pass rates but no mode (same rule as `kat data tag`)."""
    max_attempts: int = 3
    """Judge-writer tries per record."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.intents or not all(isinstance(i, str) and i for i in self.intents):
            raise ValueError("intents: expected a non-empty list of names")
        if "other" not in self.intents:
            self.intents = [*self.intents, "other"]
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts}: expected >= 1")
        bad = sorted(set(self.judge_templates) - set(MODES))
        if bad:
            raise ValueError(
                f"judge_templates: unknown mode(s) {bad}; expected among {list(MODES)}"
            )
        named = [("judge_template", self.judge_template)]
        named += [(f"judge_templates.{m}", t) for m, t in self.judge_templates.items()]
        for name, template in named:
            try:
                if not isinstance(template, str):
                    raise ValueError(f"expected a string, got {template!r}")
                template.format(intent="x", decision="x", why="x")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"{name}: expected a string with fields among {{intent}}, {{decision}}, "
                    f"{{why}}: {err}"
                ) from err


def record_mode(rec: InputRecord, margin: float) -> str | None:
    """The record's `mode`, else the majority-vote mode from `p_on`/`p_off`, else None."""
    mode = rec.data.get("mode")
    if mode in MODES:
        return mode
    p_on, p_off = rec.data.get("p_on"), rec.data.get("p_off")
    if isinstance(p_on, (int, float)) and isinstance(p_off, (int, float)):
        return decide_mode(float(p_on), float(p_off), margin)
    return None


def classify_intent(ctx: PipelineContext, rec: InputRecord, ev: Counter) -> str:
    cfg: ColdstartConfig = ctx.cfg
    given = rec.data.get("intent")
    if given in cfg.intents:
        return given
    if cfg.intent_classifier is None:
        return "other"
    ask = (cfg.intent_classifier.prompt or prompts.INTENT_PROMPT).format(
        query=rec.query, intents=", ".join(cfg.intents)
    )
    out = ctx.ask(cfg.intent_classifier, [{"role": "user", "content": ask}], 0, "coldstart/intent")
    text = out.text.lower()
    hits = [(text.find(i.lower()), -len(i), i) for i in cfg.intents if i.lower() in text]
    if not hits:
        ev["intent_unparsed"] += 1
        return "other"
    return min(hits)[2]


def write_judge(
    ctx: PipelineContext, rec: InputRecord, intent: str, mode: str, ev: Counter
) -> str | None:
    """Judge text for (query, intent, mode), or None after `max_attempts` unusable answers."""
    cfg: ColdstartConfig = ctx.cfg
    decision, why = prompts.DECISIONS[mode]
    if cfg.judge_writer is None:
        template = cfg.judge_templates.get(mode, cfg.judge_template)
        return template.format(intent=intent, decision=decision, why=why)
    ask = (cfg.judge_writer.prompt or prompts.JUDGE_WRITER_PROMPT).format(
        query=rec.query, intent=intent, decision=decision, why=why
    )
    for k in range(cfg.max_attempts):
        out = ctx.ask(cfg.judge_writer, [{"role": "user", "content": ask}], k, "coldstart/judge")
        text = out.text.strip()
        if text and find_tag(text) is None:
            return text
        ev["malformed_outputs"] += 1
    return None


def process_record(ctx: PipelineContext, rec: InputRecord) -> Outcome:
    cfg: ColdstartConfig = ctx.cfg
    ev: Counter = Counter()
    mode = record_mode(rec, cfg.margin)
    intent = classify_intent(ctx, rec, ev)
    think = rec.data.get("think") if mode == "think_on" else None
    row = {
        **rec.base_row(consumed=("mode", "think", "answer", "intent", "judge")),
        "mode": mode,
        "intent": intent,
        "think": think,
        "answer": rec.data["answer"],
    }
    judge = write_judge(ctx, rec, intent, mode, ev)
    if judge is None:
        return Outcome("rejected", {**row, "judge": None}, "no usable judge text", ev)
    content = render_response(AutoThinkResponse(judge, mode, rec.data["answer"], think))
    parse_strict(content)  # the rendered example must be canonical
    row.update(judge=judge, length=ctx.meter(content))
    row["messages"] = [*rec.messages, {"role": "assistant", "content": content}]
    return Outcome("kept", row, None, ev)


def check_record(margin: float) -> Callable[[InputRecord], None]:
    """An input check: mode (or pass rates), answer and, for think-on, think are usable."""

    def check(rec: InputRecord) -> None:
        mode = record_mode(rec, margin)
        if mode is None:
            raise ValueError("missing 'mode' (or 'p_on'/'p_off'); run kat data tag first")
        answer, think = rec.data.get("answer"), rec.data.get("think")
        AutoThinkResponse("placeholder", mode, answer, think if mode == "think_on" else None)

    return check


def _lengths(row: dict[str, Any]) -> Iterable[tuple[str, int]]:
    yield row["mode"], row["length"]


def _extra(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_intent: dict[str, Counter] = {}
    for r in rows:
        by_intent.setdefault(r["intent"], Counter())[r["mode"]] += 1
    return {
        "intent_counts": {k: sum(v.values()) for k, v in sorted(by_intent.items())},
        "mode_counts_by_intent": {k: dict(v) for k, v in sorted(by_intent.items())},
    }


def run_coldstart(cfg: ColdstartConfig) -> dict[str, Any]:
    """Run `kat data coldstart`; return the summary (also written to OUTPUT/summary.json)."""
    return run_pipeline(
        "coldstart", cfg, process_record, check_record(cfg.margin), _lengths, _extra
    )
