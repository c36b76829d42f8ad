"""Tokenize JSONL files into a Megatron indexed dataset (`PREFIX.bin`, `PREFIX.idx`).

Library side of `python tools/preprocess_data.py`. One document per line (EOD appended by
default); malformed lines are counted and reported by file and line number, never silently
dropped (`strict=True` turns the first one into an error). Outputs are written to temporary files
in the output directory and renamed at the end (.bin, then .idx, then PREFIX.meta.json), so an
interrupted run never leaves a .idx that does not match its .bin.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import uuid
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kat_megatron.data.tokenizer import encode_text, load_tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)

META_VERSION = 1
MAX_REPORTED = 10
"""Malformed lines listed individually in the stats (all are counted)."""


class MalformedInputError(ValueError):
    """A malformed JSONL line under `strict=True`."""


# Per-worker state, set by `_init_worker` (or directly when running in-process).
_TOKENIZER: Any = None
_JSON_KEY = "text"
_EOD: int | None = None


def _init_worker(tokenizer: Any, json_key: str, eod: int | None) -> None:
    global _TOKENIZER, _JSON_KEY, _EOD
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _TOKENIZER = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    _JSON_KEY, _EOD = json_key, eod


def _encode(item: tuple[int, int, bytes]) -> tuple[int, int, np.ndarray | None, str | None]:
    """(file index, line number, raw line) -> (file index, line number, ids or None, error)."""
    file_idx, lineno, raw = item
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return file_idx, lineno, None, f"invalid UTF-8 ({err.reason} at byte {err.start})"
    if not text.strip():
        return file_idx, lineno, None, "empty line"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        return file_idx, lineno, None, f"invalid JSON ({err.msg} at column {err.colno})"
    if not isinstance(doc, dict):
        return file_idx, lineno, None, f"expected a JSON object, got {type(doc).__name__}"
    if _JSON_KEY not in doc:
        return file_idx, lineno, None, f"missing key {_JSON_KEY!r}"
    value = doc[_JSON_KEY]
    if not isinstance(value, str):
        return file_idx, lineno, None, f"{_JSON_KEY!r} is {type(value).__name__}, not a string"
    ids = encode_text(_TOKENIZER, value)
    if _EOD is not None:
        ids.append(_EOD)
    return file_idx, lineno, np.asarray(ids, dtype=np.int64), None


def _read_lines(paths: Sequence[Path]) -> Iterator[tuple[int, int, bytes]]:
    for file_idx, path in enumerate(paths):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                yield file_idx, lineno, raw


def _tmp_path(final: Path) -> Path:
    """A fresh name beside `final` (same filesystem, so os.replace is atomic)."""
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = _tmp_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def preprocess_jsonl(
    inputs: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer: str | Any,
    *,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    strict: bool = False,
    chunk_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `inputs` (JSONL, one document per line) into `output_prefix`.{bin,idx,meta.json}.

    Args:
        inputs: JSONL files, concatenated in order.
        output_prefix: path prefix of the outputs (parent directories are created).
        tokenizer: a tokenizer name for `load_tokenizer` (`tiny` or a HF directory) or a loaded
            HF tokenizer (pickled to worker processes).
        json_key: the key holding each document's text.
        workers: tokenizing processes (1 = in this process); output is identical for any value.
        append_eod: append the tokenizer's eos (Megatron's eod) to every document.
        strict: raise MalformedInputError at the first malformed line instead of skipping it.
        chunk_size: lines per task sent to a worker.
        progress: show a tqdm bar (bytes read) on stderr.

    Returns:
        The stats also written to `PREFIX.meta.json`: tokenizer, tokenizer_fingerprint,
        vocab_size, dtype, documents, tokens, malformed, malformed_examples (first few as
        "file:line: reason"), empty_documents, inputs (path, size, mtime_ns, documents, malformed).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("preprocess_jsonl: no input files")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {p}")
    if workers < 1:
        raise ValueError(f"workers={workers}: expected >= 1")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    tok_name = tokenizer if isinstance(tokenizer, str) else getattr(tok, "name_or_path", "")
    vocab_size = len(tok)
    eod = tok.eos_token_id if append_eod else None
    if append_eod and eod is None:
        raise ValueError(f"tokenizer {tok_name!r} has no eos token to append as EOD")
    dtype = DType.optimal_dtype(vocab_size)

    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    meta_path = Path(f"{prefix}.meta.json")
    stats: dict[str, Any] = {
        "format_version": META_VERSION,
        "tokenizer": str(tok_name),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name,
        "json_key": json_key,
        "append_eod": append_eod,
        "documents": 0,
        "tokens": 0,
        "malformed": 0,
        "malformed_examples": [],
        "empty_documents": 0,
        "inputs": [
            {
                "path": str(p.resolve()),
                "size": p.stat().st_size,
                "mtime_ns": p.stat().st_mtime_ns,
                "documents": 0,
                "malformed": 0,
            }
            for p in paths
        ],
    }
    tmp_bin, tmp_idx = _tmp_path(bin_path), _tmp_path(idx_path)
    pool = builder = None
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        if workers > 1:
            pool = multiprocessing.get_context().Pool(
                workers, initializer=_init_worker, initargs=(tokenizer, json_key, eod)
            )
        else:
            _init_worker(tok, json_key, eod)
        total = sum(s["size"] for s in stats["inputs"])
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
        lines = _read_lines(paths)
        batch_lines = chunk_size * workers * 16  # bounds memory: imap would queue the whole file
        while batch := list(islice(lines, batch_lines)):
            if pool is not None:
                results = pool.imap(_encode, batch, chunksize=chunk_size)
            else:
                results = map(_encode, batch)
            for (_, _, raw), (file_idx, lineno, ids, error) in zip(batch, results):
                bar.update(len(raw))
                per_file = stats["inputs"][file_idx]
                if error is not None:
                    where = f"{paths[file_idx]}:{lineno}: {error}"
                    if strict:
                        raise MalformedInputError(f"malformed line {where}")
                    stats["malformed"] += 1
                    per_file["malformed"] += 1
                    if len(stats["malformed_examples"]) < MAX_REPORTED:
                        stats["malformed_examples"].append(where)
                    continue
                if len(ids) == 0:  # "" without EOD: Megatron cannot store an empty document
                    stats["empty_documents"] += 1
                    continue
                builder.add_document(ids, [len(ids)])
                stats["documents"] += 1
                stats["tokens"] += len(ids)
                per_file["documents"] += 1
        bar.close()
        builder.finalize(str(tmp_idx))
        # Never leave an old .idx beside a new .bin (or a meta that vouches for stale files).
        meta_path.unlink(missing_ok=True)
        idx_path.unlink(missing_ok=True)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        stats["bin_bytes"] = bin_path.stat().st_size
        _write_json_atomic(meta_path, stats)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    if stats["malformed"]:
        shown = "\n  ".join(stats["malformed_examples"])
        more = stats["malformed"] - len(stats["malformed_examples"])
        logger.warning(
            "skipped %d malformed line(s):\n  %s%s",
            stats["malformed"],
            shown,
            f"\n  ... and {more} more" if more else "",
        )
    if stats["empty_documents"]:
        logger.warning("skipped %d empty document(s) (no tokens)", stats["empty_documents"])
    return stats
