"""The AutoThink chat template through transformers' `apply_chat_template`; its Python mirror."""

from __future__ import annotations

import pytest

from kat_megatron.data.autothink import AutoThinkResponse, render_response
from kat_megatron.data.chat_template import (
    CHAT_TEMPLATE,
    chat_segments,
    install_chat_template,
    render_chat,
)

FIRST = render_response(
    AutoThinkResponse("Arithmetic with carries; reason.", "think_on", "\\boxed{391}", "17*23=391")
)
SECOND = render_response(AutoThinkResponse("Simple recall.", "think_off", "Paris."))

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is 17 * 23?"}],
    "system": [
        {"role": "system", "content": "You are KAT."},
        {"role": "user", "content": "hi"},
    ],
    "history": [
        {"role": "user", "content": "What is 17 * 23?"},
        {"role": "assistant", "content": FIRST},
        {"role": "user", "content": "Capital of France?"},
    ],
    "history_plain_assistant": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "  plain reply without tags  "},
        {"role": "user", "content": "again"},
    ],
    "training_target": [
        {"role": "user", "content": "What is 17 * 23?"},
        {"role": "assistant", "content": FIRST},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": SECOND},
    ],
}


def test_tiny_tokenizer_ships_the_template(tiny_tokenizer):
    assert tiny_tokenizer.chat_template == CHAT_TEMPLATE


def test_generation_prompt_opens_judge(tiny_tokenizer):
    msgs = CONVERSATIONS["one_turn"]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n<judge>\n"
    no_prompt = tiny_tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=False
    )
    assert no_prompt == "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n"


def test_history_keeps_only_the_answer(tiny_tokenizer):
    msgs = CONVERSATIONS["history"]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant\n\\boxed{391}<|im_end|>\n" in text
    assert "<judge>\nArithmetic" not in text and "17*23=391" not in text and "<think" not in text
    # The turn after the last user message is the training target and is kept whole.
    target = tiny_tokenizer.apply_chat_template(CONVERSATIONS["training_target"], tokenize=False)
    assert target.endswith(f"<|im_start|>assistant\n{SECOND}<|im_end|>\n")
    assert "17*23=391" not in target


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_python_mirror_matches_transformers(tiny_tokenizer, name, gen):
    msgs = CONVERSATIONS[name]
    expected = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert render_chat(msgs, add_generation_prompt=gen) == expected
    pieces = chat_segments(msgs, add_generation_prompt=gen)
    assert "".join(t for t, _ in pieces) == expected
    trained = "".join(t for t, keep in pieces if keep)
    assert trained == (f"{SECOND}<|im_end|>" if name == "training_target" else "")


def test_invalid_messages_are_rejected():
    with pytest.raises(ValueError, match="role='tool'"):
        render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content: expected a string"):
        render_chat([{"role": "user", "content": None}])


def test_install_chat_template_on_a_tokenizer_without_the_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    vocab["\n"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    assert install_chat_template(tok) == 10
    assert install_chat_template(tok) == 0  # idempotent, ids kept
    msgs = CONVERSATIONS["history"]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(msgs, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[-2:] == [tok.convert_tokens_to_ids("<judge>"), vocab["\n"]]
