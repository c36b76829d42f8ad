"""Data: tokenizers, JSONL -> Megatron indexed dataset preprocessing, GPT dataset building.

Exports are resolved lazily so that importing one submodule (e.g. in a preprocessing worker)
does not import all of Megatron-Core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AUTOTHINK_TOKENS": "tokenizer",
    "EOS_TOKEN": "tokenizer",
    "SPECIAL_TOKENS": "tokenizer",
    "TINY_TOKENIZER_DIR": "tokenizer",
    "MegatronTokenizerAdapter": "tokenizer",
    "add_special_tokens": "tokenizer",
    "build_tiny_tokenizer": "tokenizer",
    "encode_text": "tokenizer",
    "load_tokenizer": "tokenizer",
    "synthetic_documents": "tokenizer",
    "tokenizer_fingerprint": "tokenizer",
    "MalformedInputError": "preprocess",
    "preprocess_jsonl": "preprocess",
    "build_gpt_datasets": "gpt_data",
    "parse_blend": "gpt_data",
    "prepare_jsonl": "gpt_data",
    "write_synthetic_corpus": "gpt_data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
