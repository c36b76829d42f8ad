"""A synthetic AutoThink task a tiny model learns on CPU: easy sums answered directly, hard
products modulo 10 that need a reasoning chain.

`python -c "from kat_megatron.data.synthetic_tasks import *; ex = make_tasks(2, seed=0);
print(ex); print(autothink_answer(ex[1], 'think_on'))"` prints two examples and one answer.

- easy: "What is 3 + 4?" (two digits 0-9). Answering directly (think_off) is as good as
  reasoning: a tiny model learns the 100-entry table in a few hundred steps.
- hard: "What is 3 * 6 * 7 mod 10?" (three digits 2-9 but 5). Answered directly, the model has
  to compose two multiplications modulo 10 in one pass and does little better than the answer's
  skewed prior (the even digits dominate); the chain "3 * 6 = 18. 8 * 7 = 56." (each step
  multiplies the last digit so far by the next factor) makes every step a lookup in the
  single-digit multiplication table. In our measurement (tiny-dense, 1000 SFT steps on both
  modes) hard prompts scored 0.98-1.00 think_on and 0.44 think_off, easy ones 1.00 in both.
  Sums of four digits, the obvious first choice, are learned directly by attention averaging
  (0.96 think_off vs 0.80 think_on) and so do not need reasoning. 5 is left out of the digits
  (since 2026-12-04, as in `synthetic_steps.py`): a 5 and an even factor make 0, so "0" answered
  directly was right on ~30% of hard prompts, and the oracle router answered 38-62% of them
  directly; the demo teacher and student then had no reason to reason there (docs/autothink_data.md).

Prompts are `prompt_record`s (the input of `kat data tag`, `kat eval --data` and the RL
trainer), answers are canonical AutoThink responses (`autothink.render_response`) verified with
the `exact_match` verifier. Judge texts are one short text per category, except that a fraction
`forced_judge_rate` of SFT records and pretraining documents carry the judge text that
`autothink.forced_mode_prefix` prefills: forced-mode prompts (`kat data tag`, forced RL probes,
`kat eval --forced-judge prefill`) are then in distribution for a model trained on this data (a
tiny model trained only on the category judges fails after the unseen prefilled judge). With
the `tiny` tokenizer a whole conversation is at most 84 tokens (hard, think_on, forced judge).
Everything is deterministic in `seed`. `synthetic_steps.py` is the second task (one template over
a range of difficulty, judges per mode), built on this module's helpers.
"""

from __future__ import annotations

import inspect
import json
import os
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kat_megatron.data.autothink import (
    MODES,
    AutoThinkResponse,
    forced_mode_prefix,
    render_response,
)
from kat_megatron.data.chat_template import render_chat
from kat_megatron.utils.io import atomic_write_text

CATEGORIES = ("easy", "hard")
HARD_FACTORS = 3
"""Factors of a hard product (`HARD_DIGITS`)."""
HARD_DIGITS = (2, 3, 4, 6, 7, 8, 9)
"""Factors are drawn from these: no 0 or 1 (trivial), no 5 (module docstring)."""
DEFAULT_JUDGE = {
    "easy": "A small sum: answer now.",
    "hard": "The answer needs steps.",
}
"""Judge text per category (11 and 13 tokens in the tiny tokenizer)."""
FORCED_JUDGE: str = inspect.signature(forced_mode_prefix).parameters["judge"].default
"""The judge text `autothink.forced_mode_prefix` prefills for forced modes."""
VERIFIER = "exact_match"


@dataclass(frozen=True)
class TaskExample:
    """One question with its answer and the reasoning chain a think_on answer carries."""

    id: str
    category: str
    """"easy" or "hard"."""
    question: str
    answer: str
    reasoning: str

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category={self.category!r}: expected one of {list(CATEGORIES)}")

    def judge(self, mode: str) -> str:
        """The judge text of an answer in `mode` (this task: one per category)."""
        return DEFAULT_JUDGE[self.category]


def _easy(ex_id: str, rng: random.Random) -> TaskExample:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return TaskExample(ex_id, "easy", f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}.")


def product_mod10(factors: list[int]) -> tuple[str, str, str]:
    """(question, answer, reasoning) of "What is a * b * ... mod 10?": the chain multiplies the
    last digit so far by the next factor ("3 * 6 = 18. 8 * 7 = 56."); one factor: "7 mod 10 = 7."."""
    steps, last = [], factors[0]
    for f in factors[1:]:
        steps.append(f"{last} * {f} = {last * f}.")
        last = last * f % 10
    question = "What is " + " * ".join(map(str, factors)) + " mod 10?"
    return question, str(last), " ".join(steps) or f"{last} mod 10 = {last % 10}."


HARD_QUESTIONS = len(HARD_DIGITS) ** HARD_FACTORS
"""Distinct hard questions (343): few enough that a teacher trained long enough on transcripts
of all of them answers them from memory (`pretrain_documents(exclude=...)`)."""


def _hard(ex_id: str, rng: random.Random, exclude: Collection[str] = ()) -> TaskExample:
    for _ in range(100 * HARD_QUESTIONS):
        question, answer, reasoning = product_mod10(
            [rng.choice(HARD_DIGITS) for _ in range(HARD_FACTORS)]
        )
        if question not in exclude:
            return TaskExample(ex_id, "hard", question, answer, reasoning)
    raise ValueError(f"exclude: holds every hard question ({HARD_QUESTIONS}); none is left")


def make_tasks(
    n: int, seed: int, hard_fraction: float = 0.5, exclude: Collection[str] = ()
) -> list[TaskExample]:
    """`n` examples, exactly `round(n * hard_fraction)` of them hard, in a seeded random order;
    no hard question is one of `exclude` (a hard draw that is gets drawn again).

    Ids are `synth-{seed}-{index}`, unique within one call.
    """
    if n < 0:
        raise ValueError(f"n: expected >= 0, got {n}")
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction: expected in [0, 1], got {hard_fraction}")
    rng = random.Random(seed)
    n_hard = round(n * hard_fraction)
    categories = ["hard"] * n_hard + ["easy"] * (n - n_hard)
    rng.shuffle(categories)
    exclude = frozenset(exclude)
    return [
        _easy(f"synth-{seed}-{i}", rng)
        if cat == "easy"
        else _hard(f"synth-{seed}-{i}", rng, exclude)
        for i, cat in enumerate(categories)
    ]


def prompt_record(ex: TaskExample) -> dict[str, Any]:
    """The prompt as an input record of `kat data tag`, `kat eval --data` and the RL trainer."""
    return {
        "id": ex.id,
        "messages": [{"role": "user", "content": ex.question}],
        "reference": ex.answer,
        "verifier": VERIFIER,
        "category": ex.category,
    }


def autothink_answer(ex: TaskExample, mode: str, judge: str | None = None) -> str:
    """The canonical AutoThink answer of `ex` in `mode` (think_on carries `ex.reasoning`; the
    judge is `judge`, default `ex.judge(mode)`)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {list(MODES)}")
    resp = AutoThinkResponse(
        judge=judge if judge is not None else ex.judge(mode),
        mode=mode,
        answer=ex.answer,
        think=ex.reasoning if mode == "think_on" else None,
    )
    return render_response(resp)


def sft_record(ex: TaskExample, mode: str, judge: str | None = None) -> dict[str, Any]:
    """A chat record for `stage: sft` (`{"messages": [user, assistant]}` plus id/category/mode)."""
    return {
        "id": ex.id,
        "category": ex.category,
        "mode": mode,
        "messages": [
            {"role": "user", "content": ex.question},
            {"role": "assistant", "content": autothink_answer(ex, mode, judge)},
        ],
    }


def think_on_flags(
    examples: list[TaskExample],
    rng: random.Random,
    rate: dict[str, float],
    categories: tuple[str, ...] = CATEGORIES,
) -> list[bool]:
    """Exactly `round(rate[c] * count(c))` examples of each category think_on, chosen by rng
    (categories drawn in the order of `categories`)."""
    unknown = set(rate) - set(categories)
    if unknown:
        raise ValueError(f"think_on_rate: unknown categories {sorted(unknown)}; known: "
                         f"{list(categories)}")  # fmt: skip
    flags = [False] * len(examples)
    for cat in categories:
        idx = [i for i, ex in enumerate(examples) if ex.category == cat]
        r = rate.get(cat, 0.0)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"think_on_rate[{cat!r}]: expected in [0, 1], got {r}")
        for i in rng.sample(idx, round(r * len(idx))):
            flags[i] = True
    return flags


def rendered_records(
    examples: list[TaskExample], flags: list[bool], rng: random.Random, forced_judge_rate: float
) -> list[dict[str, Any]]:
    """SFT records of `examples` (think_on where `flags`), a `forced_judge_rate` fraction (drawn
    by rng) with `FORCED_JUDGE`, the others with each example's own judge."""
    if not 0.0 <= forced_judge_rate <= 1.0:
        raise ValueError(f"forced_judge_rate: expected in [0, 1], got {forced_judge_rate}")
    forced = set(rng.sample(range(len(examples)), round(forced_judge_rate * len(examples))))
    return [
        sft_record(ex, "think_on" if on else "think_off", FORCED_JUDGE if i in forced else None)
        for i, (ex, on) in enumerate(zip(examples, flags))
    ]


def coldstart_records(
    n: int,
    seed: int,
    think_on_rate: dict[str, float],
    hard_fraction: float = 0.5,
    forced_judge_rate: float = 0.25,
) -> list[dict[str, Any]]:
    """`n` SFT records; per category, a `think_on_rate[category]` fraction is think_on.

    E.g. `{"easy": 0.5, "hard": 1.0}`: half the easy prompts and all hard ones reason.
    Categories missing from `think_on_rate` are all think_off. A `forced_judge_rate` fraction
    carries `FORCED_JUDGE` instead of the category's judge (see the module docstring).
    """
    examples = make_tasks(n, seed, hard_fraction)
    rng = random.Random(seed + 1)
    flags = think_on_flags(examples, rng, think_on_rate)
    return rendered_records(examples, flags, rng, forced_judge_rate)


def pretrain_documents(
    n: int,
    seed: int,
    hard_fraction: float = 0.5,
    forced_judge_rate: float = 0.25,
    exclude: Collection[str] = (),
) -> list[str]:
    """`n` full chat transcripts (user question + AutoThink answer) as plain-text documents,
    half of each category think_on and half think_off, for teacher pretraining; hard questions
    in `exclude` (the demo passes its prompt and eval sets') are held out. Held out, a hard
    question answered directly is the teacher's generalisation, not its memory: of the 512 hard
    questions with 5 among the digits (before 2026-12-04) the demo's 4000 hard documents held
    each ~8 times, half answered directly; a teacher trained 3000 steps on such a corpus (eval
    questions included) answered the eval's hard products directly at 1.00, at 1000 steps 0.39
    (docs/autothink_data.md).

    Write them as `{"text": doc}` lines (`write_jsonl(path, ({"text": d} for d in docs))`) and
    tokenize with `data.preprocess.preprocess_jsonl` or `tools/preprocess_data.py`.
    """
    examples = make_tasks(n, seed, hard_fraction, exclude)
    rng = random.Random(seed + 1)
    flags = think_on_flags(examples, rng, {"easy": 0.5, "hard": 0.5})
    recs = rendered_records(examples, flags, rng, forced_judge_rate)
    return [render_chat(r["messages"]) for r in recs]


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Path:
    """Write `records` one JSON object per line, atomically; return the path."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)
    return Path(path)
