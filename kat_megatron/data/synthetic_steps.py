"""The "steps" AutoThink task: one prompt template over a range of difficulty, so that the right
mode depends on the content and on the model's competence, not on a surface token.

`python -c "from kat_megatron.data.synthetic_steps import *; ex = make_tasks(5, seed=0);
print(ex); print(autothink_answer(ex[4], 'think_on'))"` prints five examples and one answer.

Every prompt is "What is a * b * ... mod 10?" with 1 to 5 factors (digits 2-9 but 5), category
`factors_k` for k factors. The chain of a think_on answer is that of the easy/hard task's hard
products (`synthetic_tasks.product_mod10`): each step multiplies the last digit so far by the
next factor, a lookup in the single-digit table. One factor ("What is 7 mod 10?") is a copy; two
are one lookup, which a tiny model can learn directly (as it learns the easy task's sums); with
three or more the direct answer has to compose lookups in one pass (the easy/hard task measured
0.44 think_off against 0.98 think_on for three factors), so where answering directly stops
paying is the model's to find. 5 is left out of the digits: a 5 and an even factor make 0, and
with 5 among the digits "0" would be right for 46% of the 5-factor prompts, so guessing would
get easier with more steps; without it the answer of a long product is one of 2, 4, 6, 8.

Judge texts are one per mode (`JUDGE`), never per category: a judge says what the answer will
do, not which category the prompt is. As in `synthetic_tasks`, a `forced_judge_rate` fraction
of SFT records and pretraining documents carry `FORCED_JUDGE` instead. Prompts, answers and
records use `synthetic_tasks`' helpers (`prompt_record`, `autothink_answer`, `sft_record`,
`write_jsonl`); answers verify with the `exact_match` verifier. With the `tiny` tokenizer a
whole conversation is at most 101 tokens (5 factors, think_on, forced judge). Everything is
deterministic in `seed`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kat_megatron.data.chat_template import render_chat
from kat_megatron.data.synthetic_tasks import (  # noqa: F401 (the shared helpers, re-exported)
    FORCED_JUDGE,
    HARD_DIGITS,
    VERIFIER,
    TaskExample,
    autothink_answer,
    product_mod10,
    prompt_record,
    rendered_records,
    sft_record,
    think_on_flags,
    write_jsonl,
)

MIN_FACTORS, MAX_FACTORS = 1, 5
DIGITS = HARD_DIGITS
"""Factors are drawn from these (no 0 or 1: trivial; no 5: see the module docstring)."""
CATEGORIES = tuple(f"factors_{k}" for k in range(MIN_FACTORS, MAX_FACTORS + 1))
JUDGE = {
    "think_off": "Short enough: answer now.",
    "think_on": "The answer needs steps.",
}
"""Judge text per mode (the same for every category)."""
GOLD_THINK_ON_RATE = {c: float(int(c.split("_")[1]) >= 3) for c in CATEGORIES}
"""A prior for gold rows (`kat demo`'s top-up when the teacher's pipeline keeps too few rows):
think_on from three factors on, where the easy/hard task measured direct answers failing."""


def factors_of(category: str) -> int:
    """The number of factors of `category` ("factors_3" -> 3)."""
    if category not in CATEGORIES:
        raise ValueError(f"category={category!r}: expected one of {list(CATEGORIES)}")
    return int(category.split("_")[1])


@dataclass(frozen=True)
class StepsExample(TaskExample):
    """A product of `factors_of(category)` digits modulo 10."""

    def __post_init__(self) -> None:
        factors_of(self.category)

    def judge(self, mode: str) -> str:
        """The judge text of an answer in `mode`: `JUDGE[mode]`, whatever the category."""
        return JUDGE[mode]


def make_tasks(
    n: int, seed: int, min_factors: int = MIN_FACTORS, max_factors: int = MAX_FACTORS
) -> list[StepsExample]:
    """`n` examples with `min_factors..max_factors` factors, the counts as equal as they can be
    (the first `n % range` counts get one more), in a seeded random order.

    Ids are `steps-{seed}-{index}`, unique within one call.
    """
    if n < 0:
        raise ValueError(f"n: expected >= 0, got {n}")
    if not MIN_FACTORS <= min_factors <= max_factors <= MAX_FACTORS:
        raise ValueError(
            f"factors: expected {MIN_FACTORS} <= min_factors <= max_factors <= {MAX_FACTORS}, "
            f"got {min_factors}..{max_factors}"
        )
    rng = random.Random(seed)
    counts = list(range(min_factors, max_factors + 1))
    sizes = [counts[i % len(counts)] for i in range(n)]
    rng.shuffle(sizes)
    out = []
    for i, k in enumerate(sizes):
        question, answer, reasoning = product_mod10([rng.choice(DIGITS) for _ in range(k)])
        out.append(StepsExample(f"steps-{seed}-{i}", f"factors_{k}", question, answer, reasoning))
    return out


def coldstart_records(
    n: int, seed: int, think_on_rate: dict[str, float], forced_judge_rate: float = 0.25
) -> list[dict[str, Any]]:
    """`n` SFT records; per category, a `think_on_rate[category]` fraction is think_on
    (categories missing from it: all think_off). A `forced_judge_rate` fraction carries
    `FORCED_JUDGE` instead of the mode's judge."""
    examples = make_tasks(n, seed)
    rng = random.Random(seed + 1)
    flags = think_on_flags(examples, rng, think_on_rate, CATEGORIES)
    return rendered_records(examples, flags, rng, forced_judge_rate)


def pretrain_documents(n: int, seed: int, forced_judge_rate: float = 0.25) -> list[str]:
    """`n` chat transcripts (question + AutoThink answer), half of each category think_on, for
    teacher pretraining (see `synthetic_tasks.pretrain_documents`)."""
    recs = coldstart_records(n, seed, {c: 0.5 for c in CATEGORIES}, forced_judge_rate)
    return [render_chat(r["messages"]) for r in recs]
