"""JSONL -> Megatron indexed dataset: contents, malformed lines, workers, CLI, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from kat_megatron.data.gpt_data import write_synthetic_corpus
from kat_megatron.data.preprocess import MalformedInputError, preprocess_jsonl
from kat_megatron.data.tokenizer import encode_text

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "tools" / "preprocess_data.py"


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = write_synthetic_corpus(tmp_path / "corpus.jsonl", n_docs=150, seed=3)
    extra = ["<think>x</think>", "unicode: é ✓", ""]
    with open(path, "a") as f:
        f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(extra))
    return path


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_indexed_dataset_matches_direct_tokenization(tiny_tokenizer, corpus, tmp_path):
    prefix = tmp_path / "out" / "ds"
    stats = preprocess_jsonl([corpus], prefix, "tiny", progress=False)
    texts = _texts(corpus)
    expected = [encode_text(tiny_tokenizer, t) + [tiny_tokenizer.eos_token_id] for t in texts]
    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(texts) == stats["documents"]
    for i, ids in enumerate(expected):
        np.testing.assert_array_equal(ds[i], ids)
    assert ds.index.dtype == np.uint16  # Megatron's optimal dtype for a 512 vocabulary
    assert stats["tokens"] == sum(map(len, expected)) == int(ds.sequence_lengths.sum())
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    assert meta["tokenizer"] == "tiny" and meta["vocab_size"] == 512
    assert meta["documents"] == len(texts) and meta["malformed"] == 0
    assert meta["inputs"][0]["path"] == str(corpus.resolve())
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["ds.bin", "ds.idx", "ds.meta.json"]


def test_malformed_lines_counted_with_line_numbers(tiny_tokenizer, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n{"text": "two"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        b'{"text": "ok"}\n'  # 1
        b"not json\n"  # 2
        b'{"body": "x"}\n'  # 3
        b'{"text": 7}\n'  # 4
        b"\n"  # 5
        b'["text"]\n'  # 6
        b'{"text": "\xff"}\n'  # 7 (invalid UTF-8)
        b'{"text": "last"}'  # 8, no trailing newline
    )
    stats = preprocess_jsonl([good, bad], tmp_path / "ds", tiny_tokenizer, progress=False)
    assert stats["documents"] == 4 and stats["malformed"] == 6
    lines = [e.split(": ", 1)[0] for e in stats["malformed_examples"]]
    assert lines == [f"{bad}:{n}" for n in (2, 3, 4, 5, 6, 7)]
    assert "missing key 'text'" in stats["malformed_examples"][1]
    assert "int, not a string" in stats["malformed_examples"][2]
    assert [(i["documents"], i["malformed"]) for i in stats["inputs"]] == [(2, 0), (2, 6)]
    ds = IndexedDataset(str(tmp_path / "ds"))
    np.testing.assert_array_equal(ds[3], encode_text(tiny_tokenizer, "last") + [0])


def test_strict_fails_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(MalformedInputError, match=r"bad\.jsonl:2"):
        preprocess_jsonl([bad], tmp_path / "out" / "ds", "tiny", strict=True, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_workers_give_identical_output(corpus, tmp_path):
    one = preprocess_jsonl([corpus, corpus], tmp_path / "w1", "tiny", workers=1, progress=False)
    two = preprocess_jsonl(
        [corpus, corpus], tmp_path / "w2", "tiny", workers=2, chunk_size=7, progress=False
    )
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert one["tokens"] == two["tokens"] and one["documents"] == two["documents"]


def test_no_eod_and_empty_documents(tiny_tokenizer, tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hello"}\n{"text": ""}\n')
    stats = preprocess_jsonl([src], tmp_path / "ds", "tiny", append_eod=False, progress=False)
    assert stats["documents"] == 1 and stats["empty_documents"] == 1
    ds = IndexedDataset(str(tmp_path / "ds"))  # keep a reference: its arrays view its mmap
    np.testing.assert_array_equal(ds[0], encode_text(tiny_tokenizer, "hello"))


def test_interrupted_write_leaves_no_idx(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = IndexedDatasetBuilder.add_document

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        preprocess_jsonl([corpus], out / "ds", "tiny", progress=False)
    assert list(out.iterdir()) == []  # no .idx, no .bin, no temporary files


def test_failure_between_renames_never_pairs_old_idx_with_new_bin(corpus, tmp_path, monkeypatch):
    old = tmp_path / "old.jsonl"
    old.write_text('{"text": "old data"}\n')
    prefix = tmp_path / "ds"
    preprocess_jsonl([old], prefix, "tiny", progress=False)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        preprocess_jsonl([corpus], prefix, "tiny", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "ds.bin", "old.jsonl"]


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preprocess_jsonl([tmp_path / "nope.jsonl"], tmp_path / "ds", "tiny", progress=False)


def test_cli_bad_input_path_exits_nonzero(tmp_path):
    missing = tmp_path / "missing.jsonl"
    proc = subprocess.run(
        [sys.executable, str(CLI), "--input", str(missing), "--output-prefix", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "not found" in proc.stderr
    assert not (tmp_path / "o.idx").exists()


def _cli_main():
    sys.path.insert(0, str(CLI.parent))
    try:
        import preprocess_data
    finally:
        sys.path.remove(str(CLI.parent))
    return preprocess_data.main


def test_cli_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli_main()(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    for flag in ("--input", "--output-prefix", "--tokenizer", "--json-key", "--workers"):
        assert flag in out
    for flag in ("--append-eod", "--no-append-eod", "--strict"):
        assert flag in out


def test_cli_runs_and_strict_exit_code(corpus, tmp_path, capsys):
    main = _cli_main()
    args = ["--input", str(corpus), "--output-prefix", str(tmp_path / "o"), "--quiet"]
    assert main([*args, "--workers", "2"]) == 0
    assert "documents" in capsys.readouterr().out
    assert (tmp_path / "o.idx").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    args = ["--input", str(bad), "--output-prefix", str(tmp_path / "b"), "--quiet", "--strict"]
    assert main(args) == 1
    assert f"{bad}:1" in capsys.readouterr().err
    assert not (tmp_path / "b.idx").exists()
