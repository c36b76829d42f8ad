"""The "steps" AutoThink task: answers against independent arithmetic, the difficulty range,
determinism in the seed, judge texts that do not reveal the category, answers the exact_match
verifier accepts, and lengths that fit the demo's configs in the tiny tokenizer."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from kat_megatron.data.autothink import parse_strict
from kat_megatron.data.synthetic_steps import (
    CATEGORIES,
    FORCED_JUDGE,
    JUDGE,
    autothink_answer,
    coldstart_records,
    make_tasks,
    pretrain_documents,
    prompt_record,
    sft_record,
)
from kat_megatron.verifiers import get_verifier

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo"


def factors(question: str) -> list[int]:
    m = re.fullmatch(r"What is (\d(?: \* \d)*) mod 10\?", question)
    assert m, question
    return [int(x) for x in m.group(1).split(" * ")]


def test_one_template_answers_and_chains_by_independent_arithmetic():
    for ex in make_tasks(500, seed=3):
        digits = factors(ex.question)  # every prompt has the same template
        assert ex.category == f"factors_{len(digits)}" and 1 <= len(digits) <= 5
        assert all(d in (2, 3, 4, 6, 7, 8, 9) for d in digits)
        assert int(ex.answer) == math.prod(digits) % 10
        if len(digits) == 1:
            assert ex.reasoning == f"{digits[0]} mod 10 = {digits[0]}."
            continue
        steps = re.findall(r"(\d) \* (\d) = (\d+)\.", ex.reasoning)
        assert len(steps) == len(digits) - 1
        last = digits[0]
        for (a, b, c), d in zip(steps, digits[1:]):
            assert (int(a), int(b), int(c)) == (last, d, last * d)
            last = int(c) % 10
        assert str(last) == ex.answer


def test_difficulty_range_balance_and_determinism():
    a, b, c = make_tasks(103, seed=5), make_tasks(103, seed=5), make_tasks(103, seed=6)
    assert a == b and a != c
    assert len({ex.id for ex in a}) == 103 and a[0].id == "steps-5-0"
    counts = Counter(ex.category for ex in a)
    assert sorted(counts) == list(CATEGORIES) and set(counts.values()) == {20, 21}
    narrow = make_tasks(40, seed=1, min_factors=3, max_factors=4)
    assert Counter(len(factors(ex.question)) for ex in narrow) == {3: 20, 4: 20}
    assert make_tasks(0, seed=0) == []
    for lo, hi in ((0, 3), (3, 2), (1, 6)):
        with pytest.raises(ValueError, match="factors"):
            make_tasks(4, 0, min_factors=lo, max_factors=hi)


def test_judges_depend_on_the_mode_only():
    recs = coldstart_records(400, seed=2, think_on_rate={c: 0.5 for c in CATEGORIES})
    judges: dict[str, Counter] = {}
    for r in recs:
        parsed = parse_strict(r["messages"][1]["content"])
        assert parsed.mode == r["mode"]
        assert parsed.judge in (JUDGE[r["mode"]], FORCED_JUDGE)
        judges.setdefault(r["category"], Counter())[(r["mode"], parsed.judge)] += 1
    # every category shows the same (mode, judge) pairs: a judge tells nothing of the category
    assert len({frozenset(c) for c in judges.values()}) == 1 and len(judges) == len(CATEGORIES)
    for text in (*JUDGE.values(), FORCED_JUDGE):
        assert not re.search(r"\d|factor", text), text
    forced = sum(n for c in judges.values() for (_, j), n in c.items() if j == FORCED_JUDGE)
    assert forced == 100  # forced_judge_rate=0.25 of 400


def test_answers_verify_and_coldstart_rates():
    verifier = get_verifier("exact_match")
    for ex in make_tasks(60, seed=1):
        rec = prompt_record(ex)
        assert rec["messages"] == [{"role": "user", "content": ex.question}]
        assert (rec["verifier"], rec["category"], rec["reference"]) == (
            "exact_match", ex.category, ex.answer)  # fmt: skip
        for mode in ("think_on", "think_off"):
            parsed = parse_strict(autothink_answer(ex, mode))
            assert parsed.answer == ex.answer and parsed.judge == JUDGE[mode]
            assert verifier(parsed.answer, rec["reference"]).correct
            assert not verifier(str((int(ex.answer) + 1) % 10), rec["reference"]).correct
    rate = {"factors_1": 0.0, "factors_3": 0.5, "factors_5": 1.0}
    recs = coldstart_records(100, seed=4, think_on_rate=rate)
    assert recs == coldstart_records(100, seed=4, think_on_rate=rate)
    on = Counter(r["category"] for r in recs if r["mode"] == "think_on")
    assert on == {"factors_3": 10, "factors_5": 20}  # 20 per category; missing ones: think_off
    with pytest.raises(ValueError, match="unknown categories"):
        coldstart_records(4, 0, {"hard": 1.0})


def test_lengths_fit_the_demo_configs(tiny_tokenizer):
    from kat_megatron.data.packing import tokenize_chat

    cfg = {name: yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
           for name in ("student_sft", "student_rl", "tag")}  # fmt: skip
    seq_length = cfg["student_sft"]["data"]["seq_length"]
    rl_max = cfg["student_rl"]["rl"]["max_sequence_length"]
    tag_on = cfg["tag"]["think_on"]["max_tokens"]
    longest = completion = 0
    for ex in make_tasks(300, seed=0, min_factors=5):
        for judge in (None, FORCED_JUDGE):
            ids = tokenize_chat(tiny_tokenizer, sft_record(ex, "think_on", judge)["messages"]).ids
            longest = max(longest, len(ids))
        tail = autothink_answer(ex, "think_on", FORCED_JUDGE).split("<think>\n", 1)[1]
        completion = max(completion, len(tiny_tokenizer.encode(tail, add_special_tokens=False)))
    assert longest <= min(seq_length, rl_max), longest  # 101 measured
    assert completion <= tag_on, completion  # kat data tag's prefilled think_on answer
    docs = pretrain_documents(50, seed=4)
    assert docs == pretrain_documents(50, seed=4)
    assert sum("<think_on>" in d for d in docs) == 25
    assert all(d.startswith("<|im_start|>user\nWhat is ") for d in docs)
