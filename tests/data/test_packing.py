"""Packing: each document of a packed row equals its unpacked reference; attention stays in it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kat_megatron.data.autothink import AutoThinkResponse, render_response
from kat_megatron.data.packing import (
    PACKERS,
    TokenizedExample,
    pack_examples,
    tokenize_chat,
)

PAD = 0


def _conversation(rng: random.Random, i: int) -> list[dict[str, str]]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    think = " ".join(f"{a} plus {k} is {a + k}." for k in range(rng.randint(1, 6)))
    if i % 2:
        resp = AutoThinkResponse("Needs steps.", "think_on", f"{a + b}.", think)
    else:
        resp = AutoThinkResponse("Easy.", "think_off", f"The cat sees {a} birds.")
    msgs = [{"role": "user", "content": f"What is {a} plus {b}?"}]
    if i % 3 == 0:  # a multi-turn example: earlier turn reduced to its answer, untrained
        msgs = [{"role": "system", "content": "Be brief."}, *msgs[:1]]
        msgs += [{"role": "assistant", "content": render_response(resp)}]
        msgs += [{"role": "user", "content": "And again?"}]
    return [*msgs, {"role": "assistant", "content": render_response(resp)}]


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    rng = random.Random(0)
    convs = [_conversation(rng, i) for i in range(24)]
    return convs, [tokenize_chat(tiny_tokenizer, c) for c in convs]


def test_tokenize_chat_matches_apply_chat_template(tiny_tokenizer, examples):
    convs, toks = examples
    for conv, ex in zip(convs, toks):
        ids = tiny_tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert list(ex.ids) == list(ids)
        trained = tiny_tokenizer.decode([t for t, m in zip(ex.ids, ex.mask) if m])
        assert trained == conv[-1]["content"] + "<|im_end|>"  # judge, mode, think, answer, end


def _reference(ex: TokenizedExample) -> dict[str, np.ndarray]:
    """The unpacked document: what a batch of one would hold."""
    ids = np.asarray(ex.ids)
    return {
        "tokens": ids[:-1],
        "labels": ids[1:],
        "loss_mask": np.asarray(ex.mask[1:], dtype=np.float32),
        "position_ids": np.arange(len(ids) - 1),
    }


@pytest.mark.parametrize("strategy", sorted(PACKERS))
def test_packed_documents_match_unpacked_reference(examples, strategy):
    _, toks = examples
    seq = max(len(e.ids) for e in toks) + 40
    result = pack_examples(toks, seq_length=seq, pad_id=PAD, strategy=strategy)
    assert result.truncated == 0 and result.dropped == []
    seen = sorted(i for row in result.sequences for i in row.example_indices)
    assert seen == list(range(len(toks)))
    assert len(result.sequences) < len(toks)  # rows really hold several documents
    for row in result.sequences:
        cu = row.cu_seqlens
        assert cu[0] == 0 and len(cu) == len(row.example_indices) + 1
        for k, idx in enumerate(row.example_indices):
            a, b = cu[k], cu[k + 1]
            ref = _reference(toks[idx])
            np.testing.assert_array_equal(row.tokens_s[a:b], ref["tokens"])
            np.testing.assert_array_equal(row.labels_s[a:b], ref["labels"])
            np.testing.assert_array_equal(row.loss_mask_s[a:b], ref["loss_mask"])
            np.testing.assert_array_equal(row.position_ids_s[a:b], ref["position_ids"])
            assert (row.segment_ids_s[a:b] == k).all()
        tail = slice(cu[-1], seq)
        assert (row.tokens_s[tail] == PAD).all() and (row.loss_mask_s[tail] == 0).all()
        assert (row.position_ids_s[tail] == 0).all() and (row.segment_ids_s[tail] == -1).all()
    if strategy == "greedy":  # order preserved
        order = [i for row in result.sequences for i in row.example_indices]
        assert order == list(range(len(toks)))


def test_attention_mask_equals_per_document_attention(examples):
    """Dense attention under `attention_mask()` equals causal attention over each document
    alone (float64; the only difference is summation order, so 1e-12 is ample)."""
    _, toks = examples
    row = pack_examples(toks[:6], seq_length=300, pad_id=PAD).sequences[0]
    s, d = len(row.tokens_s), 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, d, generator=gen, dtype=torch.float64) for _ in range(3))
    masked = torch.from_numpy(row.attention_mask()[0])
    scores = (q @ k.T).masked_fill(masked, float("-inf"))
    packed = torch.softmax(scores, dim=-1) @ v
    for a, b in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:]):
        qs, ks, vs = q[a:b], k[a:b], v[a:b]
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        ref = torch.softmax((qs @ ks.T).masked_fill(~causal, float("-inf")), dim=-1) @ vs
        torch.testing.assert_close(packed[a:b], ref, rtol=0, atol=1e-12)
    assert torch.isfinite(packed).all()  # padding rows attend to themselves


def test_overlong_short_and_errors():
    long = TokenizedExample(tuple(range(1, 21)), (True,) * 20)
    short = TokenizedExample((5,), (True,))
    ok = TokenizedExample((1, 2, 3), (False, True, True))
    res = pack_examples([long, short, ok], seq_length=8, pad_id=PAD)
    assert res.truncated == 1 and res.dropped == [1]
    np.testing.assert_array_equal(res.sequences[0].tokens_s, np.arange(1, 9))
    np.testing.assert_array_equal(res.sequences[0].labels_s, np.arange(2, 10))
    res = pack_examples([long, short, ok], seq_length=8, pad_id=PAD, overlong="drop")
    assert res.dropped == [0, 1] and [r.example_indices for r in res.sequences] == [[2]]
    with pytest.raises(ValueError, match="known: \\['first_fit_decreasing', 'greedy'\\]"):
        pack_examples([ok], seq_length=8, pad_id=PAD, strategy="best_fit")
    with pytest.raises(ValueError, match="differ in length"):
        TokenizedExample((1, 2), (True,))
