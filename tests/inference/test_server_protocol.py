"""`kat serve`'s request/response translation without a model: forced modes through
`chat_template_kwargs.think_mode` and the autothink reasoning parser."""

from __future__ import annotations

import pytest

from kat_megatron.data.autothink import forced_mode_prefix
from kat_megatron.data.chat_template import render_chat
from kat_megatron.data.tokenizer import encode_text
from kat_megatron.inference.server import BadRequest, OpenAIProtocol
from kat_megatron.inference.types import Completion

MSGS = [{"role": "user", "content": "What is 3 + 4?"}]


def _completion(tok, text: str) -> Completion:
    ids = encode_text(tok, text)
    return Completion([1], ids, [-0.5] * len(ids), text, "stop")


def test_think_mode_appends_the_forced_prefix(tiny_tokenizer):
    proto = OpenAIProtocol(tiny_tokenizer, 512, "m")
    body = {"messages": MSGS, "chat_template_kwargs": {"think_mode": "think_on"}}
    req = proto.parse(body, chat=True)
    expected = render_chat(MSGS, add_generation_prompt=True) + forced_mode_prefix("think_on")
    assert req.prompts == [encode_text(tiny_tokenizer, expected)]
    auto = proto.parse({"messages": MSGS, "chat_template_kwargs": {"think_mode": "auto"}}, True)
    assert auto.prompts == [
        encode_text(tiny_tokenizer, render_chat(MSGS, add_generation_prompt=True))
    ]
    with pytest.raises(BadRequest, match="think_mode"):
        proto.parse({"messages": MSGS, "chat_template_kwargs": {"think_mode": "maybe"}}, True)


def test_autothink_parser_splits_answer_and_reasoning(tiny_tokenizer):
    proto = OpenAIProtocol(tiny_tokenizer, 512, "m", reasoning_parser="autothink")
    body = {"messages": MSGS, "chat_template_kwargs": {"think_mode": "think_on"}}
    req = proto.parse(body, chat=True)
    out = proto.response(
        req, [_completion(tiny_tokenizer, "3 + 4 = 7.\n</think>\n\n<answer>\n7\n</answer>")]
    )
    msg = out["choices"][0]["message"]
    assert (msg["content"], msg["reasoning_content"]) == ("7", "3 + 4 = 7.")
    assert msg["autothink"]["mode"] == "think_on" and msg["autothink"]["well_formed"]

    raw = OpenAIProtocol(tiny_tokenizer, 512, "m").response(
        proto.parse({"messages": MSGS}, chat=True), [_completion(tiny_tokenizer, "x\n</judge>")]
    )
    assert raw["choices"][0]["message"] == {"role": "assistant", "content": "x\n</judge>"}
    with pytest.raises(ValueError, match="reasoning_parser"):
        OpenAIProtocol(tiny_tokenizer, 512, "m", reasoning_parser="r1")
