"""GPT datasets from DataConfig: blends of indexed data and JSONL, mock data, the JSONL cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kat_megatron.config.schema import DataConfig
from kat_megatron.data import gpt_data
from kat_megatron.data.gpt_data import build_gpt_datasets, parse_blend, write_synthetic_corpus
from kat_megatron.data.preprocess import preprocess_jsonl
from kat_megatron.data.tokenizer import EOS_TOKEN, MegatronTokenizerAdapter

REPO = Path(__file__).resolve().parents[2]
SEQ = 32


@pytest.fixture
def sources(tmp_path) -> dict:
    """An indexed dataset (seed 1 docs) and a JSONL file (seed 2 docs)."""
    a = write_synthetic_corpus(tmp_path / "a.jsonl", n_docs=200, seed=1)
    preprocess_jsonl([a], tmp_path / "indexed" / "a", "tiny", progress=False)
    b = write_synthetic_corpus(tmp_path / "b.jsonl", n_docs=200, seed=2)
    texts = [json.loads(line)["text"] for f in (a, b) for line in f.read_text().splitlines()]
    return {"prefix": str(tmp_path / "indexed" / "a"), "jsonl": str(b), "texts": texts}


def _check_sample(sample: dict, tok: MegatronTokenizerAdapter, texts: list[str]) -> None:
    assert set(sample) >= {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
    tokens, labels = sample["tokens"], sample["labels"]
    assert tokens.shape == labels.shape == sample["loss_mask"].shape == (SEQ,)
    assert tokens.dtype == labels.dtype == torch.int64
    assert torch.equal(tokens[1:], labels[:-1])  # labels are the next tokens
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert torch.all(sample["loss_mask"] == 1.0)
    assert torch.equal(sample["attention_mask"][0], ~torch.ones(SEQ, SEQ).tril().bool())
    # Every piece between end-of-document tokens is a piece of some corpus document.
    text = tok.detokenize(tokens.tolist() + labels[-1:].tolist())
    for piece in text.split(EOS_TOKEN):
        assert any(piece in t for t in texts), piece


def test_blended_indexed_and_jsonl(tiny_adapter, sources, tmp_path):
    cfg = DataConfig(
        paths=[0.3, sources["prefix"]],
        jsonl=[0.7, sources["jsonl"]],
        seq_length=SEQ,
        split="90,10,0",
    )
    train, valid, test = build_gpt_datasets(
        cfg, None, 1234, (64, 16, 0), tmp_path / "cache", tiny_adapter
    )
    assert test is None
    assert 64 <= len(train) <= 66 and 16 <= len(valid) <= 18  # weighted blends round up
    assert type(train).__name__ == "BlendedDataset"
    ids = {int(train[i]["dataset_id"]) for i in range(len(train))}
    assert ids == {0, 1}  # both sources contribute
    for i in range(0, len(train), 7):
        _check_sample(train[i], tiny_adapter, sources["texts"])
    _check_sample(valid[0], tiny_adapter, sources["texts"])
    assert list((tmp_path / "cache" / "indices").glob("*.npy"))


def test_single_jsonl_without_weights_is_deterministic(tiny_adapter, sources, tmp_path):
    cfg = DataConfig(jsonl=[sources["jsonl"]], seq_length=SEQ, split="1,0,0")
    first = build_gpt_datasets(cfg, SEQ, 7, (10, None, None), tmp_path / "c1", tiny_adapter)
    second = build_gpt_datasets(cfg, SEQ, 7, (10, None, None), tmp_path / "c2", tiny_adapter)
    assert type(first[0]).__name__ == "GPTDataset" and first[1] is None and first[2] is None
    for i in range(10):
        assert torch.equal(first[0][i]["tokens"], second[0][i]["tokens"])


def test_unweighted_blend_repeats_data_to_reach_num_samples(tiny_adapter, sources, tmp_path):
    cfg = DataConfig(paths=[sources["prefix"]], jsonl=[sources["jsonl"]], seq_length=SEQ)
    train, _, _ = build_gpt_datasets(cfg, SEQ, 1, (2000, 10, 0), tmp_path / "cache", tiny_adapter)
    assert len(train) >= 2000  # ~5 epochs; Megatron alone would stop after one
    _check_sample(train[1999], tiny_adapter, sources["texts"])


def test_no_attention_mask_when_disabled(tiny_adapter, sources, tmp_path):
    cfg = DataConfig(paths=[sources["prefix"]], seq_length=SEQ, split="1,0,0")
    train, _, _ = build_gpt_datasets(
        cfg, SEQ, 1, (4, None, None), tmp_path / "c", tiny_adapter, create_attention_mask=False
    )
    assert set(train[0]) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert type(train).__name__ == "GPTDataset"


def test_weighted_single_source_and_zero_weight_splits(tiny_adapter, sources, tmp_path):
    cfg = DataConfig(paths=[2.0, sources["prefix"]], seq_length=SEQ, split="1,0,0")
    train, valid, test = build_gpt_datasets(
        cfg, SEQ, 1, (4, None, None), tmp_path / "c", tiny_adapter
    )
    assert type(train).__name__ == "GPTDataset" and valid is None and test is None
    both = DataConfig(paths=[1, sources["prefix"], 1, sources["prefix"]], split="9,1,0")
    train, valid, test = build_gpt_datasets(
        both, SEQ, 1, (8, 2, None), tmp_path / "c", tiny_adapter
    )
    assert type(train).__name__ == "BlendedDataset" and test is None


def test_mock_dataset(tiny_adapter):
    cfg = DataConfig(mock=True, seq_length=SEQ)
    train, valid, test = build_gpt_datasets(cfg, SEQ, 3, (8, 4, 4), None, tiny_adapter)
    assert type(train).__name__ == "MockGPTDataset" and len(train) >= 8
    sample = train[0]
    assert sample["tokens"].shape == (SEQ,)
    assert int(sample["tokens"].max()) < tiny_adapter.vocab_size
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert valid is not None and test is not None


def test_jsonl_cache_reused_until_the_file_changes(tiny_adapter, sources, tmp_path, monkeypatch):
    cfg = DataConfig(jsonl=[sources["jsonl"]], seq_length=SEQ, split="1,0,0")
    cache = tmp_path / "cache"
    build_gpt_datasets(cfg, SEQ, 1, (8, None, None), cache, tiny_adapter)
    (meta,) = (cache / "jsonl").glob("*.meta.json")
    stamp = meta.stat().st_mtime_ns
    calls = []
    real = gpt_data.preprocess_jsonl

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(gpt_data, "preprocess_jsonl", spy)
    build_gpt_datasets(cfg, SEQ, 1, (8, None, None), cache, tiny_adapter)
    assert calls == [] and meta.stat().st_mtime_ns == stamp  # reused, not re-tokenized
    with open(sources["jsonl"], "a") as f:
        f.write(json.dumps({"text": "A new line."}) + "\n")
    build_gpt_datasets(cfg, SEQ, 1, (8, None, None), cache, tiny_adapter)
    assert len(calls) == 1
    assert json.loads(meta.read_text())["documents"] == 201


def test_with_torch_distributed_initialised(tiny_adapter, sources, tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        cfg = DataConfig(paths=[1, sources["prefix"]], jsonl=[1, sources["jsonl"]], seq_length=SEQ)
        train, _, _ = build_gpt_datasets(cfg, SEQ, 1, (16, 4, 0), tmp_path / "cache", tiny_adapter)
        assert len(train) == 16
        _check_sample(train[3], tiny_adapter, sources["texts"])
    finally:
        dist.destroy_process_group()


def test_config_errors(tiny_adapter, sources, tmp_path):
    with pytest.raises(ValueError, match="data.paths, data.jsonl or data.mock"):
        build_gpt_datasets(DataConfig(), SEQ, 1, (1, 1, 1), tmp_path, tiny_adapter)
    mixed = DataConfig(paths=[1, sources["prefix"]], jsonl=[sources["jsonl"]])
    with pytest.raises(ValueError, match="weights in both lists or in neither"):
        build_gpt_datasets(mixed, SEQ, 1, (1, 1, 1), tmp_path, tiny_adapter)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_gpt_datasets(
            DataConfig(paths=["/nowhere/x"]), SEQ, 1, (1, 1, 1), tmp_path, tiny_adapter
        )
    with pytest.raises(ValueError, match="cache_dir"):
        build_gpt_datasets(
            DataConfig(jsonl=[sources["jsonl"]]), SEQ, 1, (1, 1, 1), None, tiny_adapter
        )
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        cfg = DataConfig(jsonl=[str(tmp_path / "missing.jsonl")])
        build_gpt_datasets(cfg, SEQ, 1, (1, 1, 1), tmp_path, tiny_adapter)


def test_parse_blend():
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend([1, "a", "3", "b"]) == (["a", "b"], [1.0, 3.0])
    with pytest.raises(ValueError):
        parse_blend(["a", 1])
    with pytest.raises(ValueError):
        parse_blend([0, "a"])


def test_example_corpus_is_the_generated_one(tmp_path):
    committed = REPO / "examples" / "tiny_pretrain" / "corpus.jsonl"
    fresh = write_synthetic_corpus(tmp_path / "corpus.jsonl", n_docs=2000, seed=0)
    assert committed.read_bytes() == fresh.read_bytes()
    assert os.path.getsize(committed) < 300_000
