"""The AutoThink chat template (Jinja, for `apply_chat_template`) and its Python mirror.

`python -c "from kat_megatron.data.chat_template import render_chat; print(render_chat(
[{'role': 'user', 'content': 'hi'}], add_generation_prompt=True))"` prints the prompt a model sees.

ChatML turns `<|im_start|>{role}\\n{content}<|im_end|>\\n`, as released for KAT-V1:
- the generation prompt is `<|im_start|>assistant\\n<judge>\\n`, so every answer opens its judge;
- assistant turns *before the last user turn* keep only their `<answer>` text
  (`autothink.answer_only`); assistant turns after it (the training target) are kept whole.
No default system prompt is inserted (the released template's default, if any, is unknown to us).
The Jinja source lives in `kat_megatron/assets/chat_templates/autothink.jinja`; `render_chat`
produces the same text and `chat_segments` additionally marks which characters are trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kat_megatron.data.autothink import (
    ALL_TAGS,
    GENERATION_PREFIX,
    IM_END,
    IM_START,
    answer_only,
)

TEMPLATE_PATH = (
    Path(__file__).resolve().parent.parent / "assets" / "chat_templates" / "autothink.jinja"
)
CHAT_TEMPLATE = TEMPLATE_PATH.read_text(encoding="utf-8")
"""The Jinja chat template text (installed in the tiny tokenizer's tokenizer_config.json)."""
ROLES = ("system", "user", "assistant")

Message = dict[str, Any]


def validate_messages(messages: Sequence[Message]) -> None:
    """Raise ValueError unless `messages` is a non-empty list of {role, content: str} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: expected a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}]: expected an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role={m['role']!r}: expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content: expected a string")


def _last_user(messages: Sequence[Message]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)


def chat_segments(
    messages: Sequence[Message], add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, split at special tokens.

    Trained pieces are the contents of assistant turns after the last user turn plus their
    `<|im_end|>` (the model must learn to stop); headers, earlier turns and the generation
    prompt are not trained. `"".join(text for text, _ in pieces) == render_chat(...)`.
    """
    validate_messages(messages)
    last_user = _last_user(messages)
    pieces: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        content, role = m["content"], m["role"]
        trained = role == "assistant" and i > last_user
        if role == "assistant" and not trained:
            content = answer_only(content)
        pieces.append((f"{IM_START}{role}\n", False))
        pieces.append((content + IM_END, trained))
        pieces.append(("\n", False))
    if add_generation_prompt:
        pieces.append((f"{IM_START}assistant\n", False))
        pieces.append((GENERATION_PREFIX, False))
    return [(text, trained) for text, trained in pieces if text]


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text, identical to `apply_chat_template(..., tokenize=False)`."""
    return "".join(text for text, _ in chat_segments(messages, add_generation_prompt))


def install_chat_template(tokenizer: Any) -> int:
    """Give a Hugging Face tokenizer (e.g. Qwen2's) the AutoThink tokens and chat template.

    Adds the ChatML and AutoThink special tokens that are missing (existing ids are kept) and
    sets `tokenizer.chat_template`; returns the number of new tokens (resize the model's
    embedding when it is > 0).
    """
    # Same as tokenizer.add_special_tokens, without importing Megatron-Core through that module.
    new = [t for t in ALL_TAGS if t != "<|endoftext|>" and t not in tokenizer.get_vocab()]
    added = 0
    if new:
        spec = {"additional_special_tokens": new}
        try:
            added = tokenizer.add_special_tokens(spec, replace_extra_special_tokens=False)
        except TypeError:  # transformers < 5
            added = tokenizer.add_special_tokens(spec, replace_additional_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return added
