"""Offline teacher top-K store: round trip, atomic publish, merge, and every loud failure.

.venv/bin/python -m pytest tests/data/test_teacher_topk.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kat_megatron.data.teacher_topk import (
    TeacherTopKMeta,
    TeacherTopKMismatch,
    TeacherTopKReader,
    TeacherTopKWriter,
    merge_teacher_topk,
    token_hash,
)

S, K, V = 6, 4, 50


def _meta(**kw) -> TeacherTopKMeta:
    base = dict(seq_length=S, topk=K, vocab_size=V, temperature=1.0,
                tokenizer_fingerprint="tok-A", data_fingerprint="data-A")  # fmt: skip
    return TeacherTopKMeta(**{**base, **kw})


def _rows(sample_indices, seed=0):
    """Per-sample tokens and a valid top-K (unique ids, sorted log-probs) for each index."""
    out = []
    for i in sample_indices:
        g = torch.Generator().manual_seed(seed * 1000 + i)
        logits = torch.randn(S, V, generator=g)
        lq = torch.log_softmax(logits, -1)
        vals, ids = lq.topk(K, -1)
        res = torch.log1p(-vals.exp().sum(-1))
        out.append((torch.randint(0, V, (S,), generator=g), ids, vals, res))
    return [torch.stack(x) for x in zip(*out, strict=True)]


def _dump(path, indices_per_batch, rows_per_shard=3, **meta_kw):
    with TeacherTopKWriter(path, _meta(**meta_kw), rows_per_shard=rows_per_shard) as w:
        for idx in indices_per_batch:
            w.write(idx, *_rows(idx))
    return path


def test_round_trip_across_shards_in_any_order(tmp_path):
    out = _dump(tmp_path / "t", [[7, 3, 9, 1], [4, 0]], logprob_dtype="float32")
    header = json.loads((out / "header.json").read_text())
    assert header["num_rows"] == 6 and [s["rows"] for s in header["shards"]] == [3, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temp dir left behind
    reader = TeacherTopKReader(out, tokenizer_fingerprint="tok-A", data_fingerprint="data-A")
    assert len(reader) == 6 and reader.topk == K and reader.temperature == 1.0
    assert reader.order.tolist() == [7, 3, 9, 1, 4, 0]
    want = [9, 0, 3, 4]
    tokens, ids, lq, res = _rows(want)
    batch = reader.batch(want, tokens)
    assert batch.ids_bsk.dtype == torch.int64 and batch.logprobs_bsk.dtype == torch.float32
    assert torch.equal(batch.ids_bsk, ids)
    assert torch.equal(batch.logprobs_bsk, lq) and torch.equal(batch.residual_bs, res)
    reader2 = TeacherTopKReader(
        out, tokenizer_fingerprint="tok-A", expected_order=[7, 3, 9, 1, 4, 0]
    )
    assert reader2.rows([0]).tolist() == [5]


def test_float16_storage_rounds_logprobs_only(tmp_path):
    out = _dump(tmp_path / "t", [[2, 5]])
    tokens, ids, lq, res = _rows([5, 2])
    batch = TeacherTopKReader(out, tokenizer_fingerprint="tok-A").batch([5, 2], tokens)
    assert torch.equal(batch.ids_bsk, ids)
    # fp16 keeps 11 significant bits: relative error <= 2^-11 on each stored log-prob
    torch.testing.assert_close(batch.logprobs_bsk, lq, atol=0, rtol=2.0**-11)
    torch.testing.assert_close(batch.residual_bs, res, atol=0, rtol=2.0**-11)


def test_failed_write_publishes_nothing_and_existing_dump_is_kept(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with TeacherTopKWriter(tmp_path / "t", _meta()) as w:
            w.write([0], *_rows([0]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    _dump(tmp_path / "t", [[0]])
    with pytest.raises(FileExistsError, match="overwrite"):
        TeacherTopKWriter(tmp_path / "t", _meta())
    with TeacherTopKWriter(tmp_path / "t", _meta(), overwrite=True) as w:
        w.write([1, 2], *_rows([1, 2]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert TeacherTopKReader(tmp_path / "t", tokenizer_fingerprint="tok-A").order.tolist() == [1, 2]


def test_writer_rejects_bad_rows(tmp_path):
    tokens, ids, lq, res = _rows([0, 1])
    with TeacherTopKWriter(tmp_path / "t", _meta()) as w:
        with pytest.raises(ValueError, match="shape"):
            w.write([0, 1], tokens, ids[:, :, :2], lq, res)
        dup = ids.clone()
        dup[0, 0, 1] = dup[0, 0, 0]
        with pytest.raises(ValueError, match="unique"):
            w.write([0, 1], tokens, dup, lq, res)
        with pytest.raises(ValueError, match="outside"):
            w.write([0, 1], tokens, ids + V, lq, res)
        w.write([0, 1], tokens, ids, lq, res)
        w.write([1], *_rows([1]))
        with pytest.raises(ValueError, match="written twice"):
            w.close()
    assert list(tmp_path.iterdir()) == []  # the failed close published nothing
    with pytest.raises(ValueError, match="topk"):
        _meta(topk=V + 1)
    with pytest.raises(ValueError, match="logprob_dtype"):
        _meta(logprob_dtype="bfloat16")


@pytest.fixture
def dump(tmp_path):
    return _dump(tmp_path / "t", [[0, 1, 2], [3]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokenizer_fingerprint": "tok-B"}, "tokenizer_fingerprint='tok-A'.*'tok-B'"),
        ({"tokenizer_fingerprint": "tok-A", "data_fingerprint": "data-B"}, "data_fingerprint"),
        ({"tokenizer_fingerprint": "tok-A", "vocab_size": V + 1}, "vocab_size"),
        ({"tokenizer_fingerprint": "tok-A", "expected_order": [0, 2, 1, 3]}, "first difference at row 1"),
        ({"tokenizer_fingerprint": "tok-A", "expected_order": [0, 1, 2]}, "holds 4 samples"),
    ],
)  # fmt: skip
def test_reader_fails_loudly_on_mismatch(dump, kwargs, match):
    with pytest.raises(TeacherTopKMismatch, match=match):
        TeacherTopKReader(dump, **kwargs)


def test_reader_checks_samples_tokens_and_files(dump):
    reader = TeacherTopKReader(dump, tokenizer_fingerprint="tok-A")
    with pytest.raises(TeacherTopKMismatch, match=r"samples \[9\] are not in"):
        reader.batch([1, 9])
    tokens = _rows([2, 3])[0]
    tokens[1, 0] += 1
    with pytest.raises(TeacherTopKMismatch, match="sample 3 .batch row 1.: its tokens differ"):
        reader.batch([2, 3], tokens)
    shard = dump / "logprobs.00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(TeacherTopKMismatch, match="truncated"):
        TeacherTopKReader(dump, tokenizer_fingerprint="tok-A")
    header = json.loads((dump / "header.json").read_text())
    (dump / "header.json").write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(TeacherTopKMismatch, match="v99"):
        TeacherTopKReader(dump, tokenizer_fingerprint="tok-A")


def test_merge_per_rank_parts(tmp_path):
    p0 = _dump(tmp_path / "part-0", [[0, 2]], rows_per_shard=1)
    p1 = _dump(tmp_path / "part-1", [[1, 3, 5]], rows_per_shard=2)
    out = merge_teacher_topk([p0, p1], tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    reader = TeacherTopKReader(out, tokenizer_fingerprint="tok-A")
    assert reader.order.tolist() == [0, 2, 1, 3, 5]
    tokens, ids, lq, _ = _rows([5, 0, 3])
    batch = reader.batch([5, 0, 3], tokens)
    assert torch.equal(batch.ids_bsk, ids)
    torch.testing.assert_close(batch.logprobs_bsk, lq, atol=0, rtol=2.0**-11)
    q0 = _dump(tmp_path / "q0", [[0]])
    q1 = _dump(tmp_path / "q1", [[1]], temperature=2.0)
    with pytest.raises(TeacherTopKMismatch, match="different settings"):
        merge_teacher_topk([q0, q1], tmp_path / "m2")


def test_token_hash_depends_on_values_not_dtype():
    a = np.array([1, 2, 3], dtype=np.int32)
    assert token_hash(a) == token_hash(torch.tensor([1, 2, 3])) != token_hash(a[::-1])
