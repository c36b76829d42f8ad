"""The AutoThink format: render/parse round trips, strict errors with positions, lenient reads."""

from __future__ import annotations

import json

import pytest

from kat_megatron.data.autothink import (
    AUTOTHINK_TAGS,
    GENERATION_PREFIX,
    AutoThinkResponse,
    FormatError,
    answer_only,
    parse_lenient,
    parse_strict,
    render_response,
    strip_reasoning,
)

ON = AutoThinkResponse(
    judge="A multi-step word problem; careful reasoning helps.",
    mode="think_on",
    think="17 * 23 = 17 * 20 + 17 * 3\n= 340 + 51\n= 391.\n\nCheck: 391 / 23 = 17. ✓",
    answer="The product is \\boxed{391}.",
)
OFF = AutoThinkResponse(judge="A greeting; no reasoning needed.", mode="think_off", answer="Hi!")


def test_tags_match_the_tiny_tokenizer():
    from kat_megatron.data.chat_template import TEMPLATE_PATH

    cfg = TEMPLATE_PATH.parents[1] / "tiny_tokenizer" / "tokenizer_config.json"
    specials = json.loads(cfg.read_text())["extra_special_tokens"]
    assert specials[2:] == list(AUTOTHINK_TAGS)


def test_render_layout():
    assert render_response(OFF) == (
        "<judge>\nA greeting; no reasoning needed.\n</judge>\n\n"
        "<think_off>\n<answer>\nHi!\n</answer>"
    )
    text = render_response(ON)
    assert text.startswith(GENERATION_PREFIX)
    assert "</judge>\n\n<think_on>\n<think>\n17 * 23" in text
    assert "✓\n</think>\n\n<answer>\nThe product" in text


@pytest.mark.parametrize("resp", [ON, OFF], ids=["think_on", "think_off"])
def test_round_trip(resp):
    text = render_response(resp)
    assert parse_strict(text) == resp
    assert render_response(parse_strict(text)) == text
    assert parse_strict(text + "<|im_end|>") == resp
    assert parse_strict(text + "<|endoftext|>") == resp
    lenient = parse_lenient(text + "<|im_end|>")
    assert lenient.well_formed and (lenient.mode, lenient.answer) == (resp.mode, resp.answer)
    # Section texts keep their own leading/trailing whitespace.
    odd = AutoThinkResponse(" judge ", resp.mode, "\nanswer\n", "  t\n" if resp.think else None)
    assert parse_strict(render_response(odd)) == odd


def _case(text: str, anchor: str, nth: int = 1) -> int:
    pos = -1
    for _ in range(nth):
        pos = text.index(anchor, pos + 1)
    return pos


_OFF = render_response(OFF)
_ON = render_response(ON)
MALFORMED = [
    ("Hi!", lambda t: 0, "expected '<judge>\\n'"),
    (
        "<judge>\nj\n</judge>\n\n<think_on>\n<answer>\n",
        lambda t: _case(t, "<answer>"),
        "<think>",
    ),
    ("<judge>\nno end", lambda t: len(t), "unterminated judge"),
    (_OFF.replace("<think_off>", "<think_maybe>"), lambda t: _case(t, "<think_maybe"), "expected"),
    (
        _OFF.replace("<answer>", "<think>\nx\n</think>\n\n<answer>"),
        lambda t: _case(t, "<think>"),
        "'<think>' is not allowed after '<think_off>'",
    ),
    (_ON.replace("</think>", ""), lambda t: _case(t, "<answer>"), "unexpected '<answer>' in think"),
    (_OFF.replace("Hi!", "Hi <judge> there"), lambda t: _case(t, "<judge>", 2), "in answer"),
    (_OFF + "\nmore", lambda t: _case(t, "\nmore"), "unexpected text after '</answer>'"),
    (_ON.replace(ON.think, " \n "), lambda t: _case(t, "<think>") + 8, "empty think"),
    (_OFF.replace("Hi!\n</answer>", "Hi!</answer>"), lambda t: _case(t, "</answer>"), "newline"),
    (_OFF.replace("</judge>\n\n", "</judge>\n"), lambda t: _case(t, "<think_off>"), "expected"),
]


@pytest.mark.parametrize("text,where,message", MALFORMED)
def test_malformed_outputs_rejected_with_positions(text, where, message):
    with pytest.raises(FormatError) as info:
        parse_strict(text)
    err = info.value
    assert err.pos == where(text), str(err)
    assert message in str(err)
    assert err.line == text[: err.pos].count("\n") + 1
    assert err.column == err.pos - (text.rfind("\n", 0, err.pos) + 1) + 1
    assert f"line {err.line}, column {err.column} (offset {err.pos})" in str(err)
    lenient = parse_lenient(text)  # never raises; keeps the strict error
    assert not lenient.well_formed and lenient.error.pos == err.pos


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(judge="j", mode="think_maybe", answer="a"), "mode='think_maybe'"),
        (dict(judge="j", mode="think_off", answer="a", think="t"), "no reasoning"),
        (dict(judge="j", mode="think_on", answer="a"), "think: expected non-empty"),
        (dict(judge="  ", mode="think_off", answer="a"), "judge: expected non-empty"),
        (dict(judge="j", mode="think_off", answer="a <|im_end|>"), "special token '<|im_end|>'"),
    ],
)
def test_response_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoThinkResponse(**kwargs)


@pytest.mark.parametrize(
    "text,mode,judge,think,answer",
    [
        ("<judge>\nj\n</judge>\n<think_on><think>r</think><answer>42", "think_on", "j", "r", "42"),
        ("easy\n</judge>\n\n<think_off>\nParis.<|im_end|>", "think_off", "easy", None, "Paris."),
        ("<judge>j</judge><think_on><think>a\nb</think>\nso 7", "think_on", "j", "a\nb", "so 7"),
        ("just an answer", None, None, None, "just an answer"),
        ("<think_off><answer>1</answer><answer>2</answer>", "think_off", None, None, "2"),
        ("<think>unfinished reasoning", None, None, "unfinished reasoning", ""),
    ],
)
def test_lenient_parser(text, mode, judge, think, answer):
    got = parse_lenient(text)
    assert (got.mode, got.judge, got.think, got.answer) == (mode, judge, think, answer)
    assert not got.well_formed


def test_answer_only_and_strip_reasoning():
    assert answer_only(render_response(ON)) == ON.answer
    assert answer_only("plain reply") == "plain reply"
    assert answer_only("<answer> a </answer> tail") == "a"
    assert strip_reasoning("<think>\nwhy\n</think>\n\n42") == ("why", "42")
    assert strip_reasoning("no reasoning here") == (None, "no reasoning here")
