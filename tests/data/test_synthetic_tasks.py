"""The synthetic easy/hard AutoThink task: answers against independent arithmetic, canonical
formatting, determinism, class balance and sequence lengths in the tiny tokenizer."""

from __future__ import annotations

import json
import math
import re

import pytest

from kat_megatron.data.autothink import forced_mode_prefix, parse_strict
from kat_megatron.data.synthetic_tasks import (
    DEFAULT_JUDGE,
    FORCED_JUDGE,
    autothink_answer,
    coldstart_records,
    make_tasks,
    pretrain_documents,
    prompt_record,
    sft_record,
    write_jsonl,
)
from kat_megatron.verifiers import get_verifier


def parse_question(question: str) -> tuple[str, list[int]]:
    """("easy", [a, b]) for "What is a + b?", ("hard", factors) for "What is a * b * c mod 10?"."""
    if m := re.fullmatch(r"What is (\d) \+ (\d)\?", question):
        return "easy", [int(m.group(1)), int(m.group(2))]
    m = re.fullmatch(r"What is (\d(?: \* \d)+) mod 10\?", question)
    assert m, question
    return "hard", [int(x) for x in m.group(1).split(" * ")]


def test_answers_and_reasoning_by_independent_arithmetic():
    tasks = make_tasks(400, seed=3)
    for ex in tasks:
        category, digits = parse_question(ex.question)
        assert category == ex.category
        if category == "easy":
            assert all(0 <= d <= 9 for d in digits)
            assert int(ex.answer) == digits[0] + digits[1]
            assert ex.reasoning == f"{digits[0]} + {digits[1]} = {ex.answer}."
            continue
        assert len(digits) == 3 and all(2 <= d <= 9 and d != 5 for d in digits)
        assert int(ex.answer) == math.prod(digits) % 10
        # every step "a * b = c." is true, and a is the last digit of the previous product
        steps = re.findall(r"(\d) \* (\d) = (\d+)\.", ex.reasoning)
        assert len(steps) == len(digits) - 1
        last = digits[0]
        for (a, b, c), d in zip(steps, digits[1:]):
            assert (int(a), int(b), int(c)) == (last, d, last * d)
            last = int(c) % 10
        assert str(last) == ex.answer


def test_rendered_answers_are_canonical_and_verify():
    verifier = get_verifier("exact_match")
    for ex in make_tasks(50, seed=1):
        rec = prompt_record(ex)
        assert rec["messages"] == [{"role": "user", "content": ex.question}]
        assert rec["verifier"] == "exact_match" and rec["category"] == ex.category
        for mode in ("think_on", "think_off"):
            text = autothink_answer(ex, mode)
            parsed = parse_strict(text)
            assert parsed.mode == mode and parsed.answer == ex.answer
            assert parsed.think == (ex.reasoning if mode == "think_on" else None)
            assert verifier(parsed.answer, rec["reference"]).correct
            assert not verifier(str(int(ex.answer) + 1), rec["reference"]).correct
        assert parse_strict(autothink_answer(ex, "think_off", judge="Custom.")).judge == "Custom."
    with pytest.raises(ValueError, match="mode"):
        autothink_answer(ex, "auto")


def test_determinism_and_class_balance():
    a, b, c = make_tasks(101, seed=5), make_tasks(101, seed=5), make_tasks(101, seed=6)
    assert a == b and a != c
    assert len({ex.id for ex in a}) == 101
    assert sum(ex.category == "hard" for ex in a) == round(101 * 0.5)
    assert sum(ex.category == "hard" for ex in make_tasks(40, 0, hard_fraction=0.25)) == 10
    assert all(ex.category == "easy" for ex in make_tasks(10, 0, hard_fraction=0.0))
    with pytest.raises(ValueError, match="hard_fraction"):
        make_tasks(4, 0, hard_fraction=1.5)


def test_held_out_hard_questions_stay_out_of_the_corpus():
    """`exclude`: no hard question of the held-out set in the examples or the pretraining
    documents (checked by parsing the rendered text), the rest of the draw unchanged in kind;
    excluding all 7^3 hard questions (digits 2-9 but 5) is an error, not a hang."""
    from itertools import product

    held = {ex.question for ex in make_tasks(300, seed=2) if ex.category == "hard"}
    assert 50 < len(held) < 150
    ex = make_tasks(2000, seed=9, exclude=held)
    hard = [e.question for e in ex if e.category == "hard"]
    assert len(hard) == 1000 and not held & set(hard)
    assert len(set(hard)) > 343 - len(held) - 20  # the other questions still appear, most of them
    docs = pretrain_documents(1000, seed=4, exclude=held)
    asked = {re.search(r"user\n(.*?)<\|im_end\|>", d).group(1) for d in docs}
    assert not held & asked and any(parse_question(q)[0] == "hard" for q in asked)
    assert pretrain_documents(50, seed=4) == pretrain_documents(50, seed=4, exclude=())
    every = {
        "What is " + " * ".join(map(str, f)) + " mod 10?"
        for f in product((2, 3, 4, 6, 7, 8, 9), repeat=3)
    }
    with pytest.raises(ValueError, match="every hard question"):
        make_tasks(4, 0, exclude=every)


def test_coldstart_rates_and_sft_records(tmp_path):
    recs = coldstart_records(200, seed=2, think_on_rate={"easy": 0.25, "hard": 1.0})
    assert recs == coldstart_records(200, seed=2, think_on_rate={"easy": 0.25, "hard": 1.0})
    judges = [parse_strict(r["messages"][1]["content"]).judge for r in recs]
    assert judges.count(FORCED_JUDGE) == 50  # forced_judge_rate=0.25
    assert all(j in (FORCED_JUDGE, DEFAULT_JUDGE[r["category"]]) for j, r in zip(judges, recs))
    # the forced judge is exactly what forced-mode prompts prefill
    assert forced_mode_prefix("think_on").startswith(FORCED_JUDGE + "\n</judge>")
    none = coldstart_records(20, seed=2, think_on_rate={}, forced_judge_rate=0.0)
    assert all(FORCED_JUDGE not in r["messages"][1]["content"] for r in none)
    by_cat = {"easy": [], "hard": []}
    for r in recs:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        parsed = parse_strict(r["messages"][1]["content"])
        assert parsed.mode == r["mode"]
        by_cat[r["category"]].append(r["mode"] == "think_on")
    assert len(by_cat["easy"]) == len(by_cat["hard"]) == 100
    assert sum(by_cat["easy"]) == 25 and all(by_cat["hard"])
    with pytest.raises(ValueError, match="unknown categories"):
        coldstart_records(4, 0, {"medium": 1.0})
    path = write_jsonl(tmp_path / "sub" / "cs.jsonl", recs[:3])
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs[:3]


def test_sequence_lengths_and_pretrain_documents(tiny_tokenizer):
    from kat_megatron.data.packing import tokenize_chat
    from kat_megatron.data.tokenizer import encode_text

    longest = max(
        len(tokenize_chat(tiny_tokenizer, sft_record(ex, "think_on", judge)["messages"]).ids)
        for ex in make_tasks(200, seed=0, hard_fraction=1.0)
        for judge in (None, FORCED_JUDGE)
    )
    assert longest < 96, longest  # the longest record: hard, think_on, the forced judge
    docs = pretrain_documents(40, seed=4)
    assert docs == pretrain_documents(40, seed=4) and len(docs) == 40
    kinds = {
        (parse_question(d.split("\n")[1].removesuffix("<|im_end|>"))[0], "<think_on>" in d)
        for d in docs
    }
    assert len(kinds) == 4  # both classes in both modes
    assert sum(FORCED_JUDGE in d for d in docs) == 10  # forced_judge_rate=0.25 of 40
    for d in docs:
        assert d.startswith("<|im_start|>user\n") and d.endswith("<|im_end|>\n")
        ids = encode_text(tiny_tokenizer, d)
        # special tokens stay single ids
        assert tiny_tokenizer.convert_tokens_to_ids("<judge>") in ids
