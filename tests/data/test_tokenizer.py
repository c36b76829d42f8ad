"""The packaged tiny tokenizer, tokenizer helpers and the Megatron-Core adapter."""

from __future__ import annotations

import json

import pytest

from kat_megatron.data.tokenizer import (
    SPECIAL_TOKENS,
    TINY_TOKENIZER_DIR,
    MegatronTokenizerAdapter,
    add_special_tokens,
    build_tiny_tokenizer,
    encode_text,
    load_tokenizer,
    synthetic_documents,
)

ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def test_tiny_tokenizer_vocab_and_special_tokens(tiny_tokenizer):
    assert len(tiny_tokenizer) == 512
    assert [tiny_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(11))
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.eos_token_id == tiny_tokenizer.pad_token_id == 0
    assert set(SPECIAL_TOKENS) <= set(tiny_tokenizer.all_special_tokens)


def test_tiny_tokenizer_roundtrip_and_atomic_special_tokens(tiny_tokenizer):
    text = "<judge>easy</judge><think_off><answer>12 + 7 = 19.</answer><|im_end|>"
    ids = encode_text(tiny_tokenizer, text)
    assert tiny_tokenizer.decode(ids) == text
    for tok in ("<judge>", "</judge>", "<think_off>", "<answer>", "</answer>", "<|im_end|>"):
        assert tiny_tokenizer.convert_tokens_to_ids(tok) in ids
    assert encode_text(tiny_tokenizer, text) == tiny_tokenizer.encode(
        text, add_special_tokens=False
    )
    # Trained on the synthetic corpus, so its words compress well.
    doc = synthetic_documents(1, seed=99)[0]
    assert len(encode_text(tiny_tokenizer, doc)) < len(doc) / 2
    word = "héllo wörld ✓"
    assert tiny_tokenizer.decode(encode_text(tiny_tokenizer, word)) == word  # byte fallback


def test_rebuild_is_byte_identical(tmp_path):
    out = build_tiny_tokenizer(tmp_path / "tok")
    for name in ASSET_FILES:
        assert (out / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name


def test_synthetic_documents_are_deterministic():
    assert synthetic_documents(50, seed=5) == synthetic_documents(50, seed=5)
    assert synthetic_documents(50, seed=5) != synthetic_documents(50, seed=6)


def test_load_tokenizer_from_directory_and_errors(tmp_path):
    tok = load_tokenizer(str(TINY_TOKENIZER_DIR))
    assert len(tok) == 512
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(str(missing))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="directory"):
        load_tokenizer(str(tmp_path / "file.txt"))


def test_add_special_tokens():
    tok = load_tokenizer("tiny")  # its own copy, not the shared fixture: tokens are added
    assert add_special_tokens(tok, ["<think>", "<|im_start|>"]) == 0
    assert add_special_tokens(tok, ["<tool>", "</tool>", "<think>"]) == 2
    assert len(tok) == 514
    assert tok.convert_tokens_to_ids("<tool>") == 512
    assert tok.convert_tokens_to_ids("<think>") == SPECIAL_TOKENS.index("<think>")
    assert {"<tool>", "</tool>", "<answer>"} <= set(tok.all_special_tokens)
    assert encode_text(tok, "a<tool>b") == [*encode_text(tok, "a"), 512, *encode_text(tok, "b")]


def test_megatron_adapter(tiny_tokenizer):
    from megatron.core.tokenizers import MegatronTokenizerBase

    adapter = MegatronTokenizerAdapter(tiny_tokenizer, name="tiny")
    assert isinstance(adapter, MegatronTokenizerBase)
    assert adapter.vocab_size == 512
    assert adapter.eod == adapter.eos == 0
    assert adapter.pad == -1  # pad == eod: Megatron's "no pad token" sentinel
    assert adapter.pad_token_id == 0
    assert adapter.tokenize("The cat.") == encode_text(tiny_tokenizer, "The cat.")
    assert adapter.detokenize(adapter.tokenize("The cat.")) == "The cat."
    assert adapter.inv_vocab[adapter.vocab["<think>"]] == "<think>"
    ident = json.loads(json.dumps(adapter.unique_identifiers))
    assert ident["tokenizer_path"] == "tiny" and len(ident["fingerprint"]) == 64
    assert MegatronTokenizerAdapter.from_name("tiny").fingerprint == adapter.fingerprint
