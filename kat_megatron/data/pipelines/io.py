"""Pipeline input and output: JSONL records with line-numbered errors, the resumable work log,
atomic outputs (HF `datasets` on disk + JSONL + summary JSON) and length percentiles.

Library side of `kat data {tag,synthesize,coldstart}`. An input record is a JSON object with
`query` (string) or `messages` (chat turns ending with a user turn), and optionally `id`,
`reference`, `verifier`, plus pipeline-specific fields. Malformed lines are counted and reported
with their line numbers, never silently dropped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kat_megatron.data.chat_template import validate_messages
from kat_megatron.utils.io import atomic_write_text, json_line  # noqa: F401 (re-exported)

KNOWN_FIELDS = ("id", "query", "messages", "reference", "verifier")
CARRIED_FIELDS = ("intent", "p_on", "p_off", "votes", "judge_vote", "unsolved")
"""Fields of earlier pipelines' outputs kept as top-level columns when present."""
DROPPED_FIELDS = ("line",)
"""Fields of earlier outputs that do not carry over (rewritten by each pipeline)."""
TINY_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny_tokenizer"
JSON_COLUMNS = ("reference", "meta")
"""Columns stored as JSON text in the arrow dataset (their types vary between records)."""


@dataclass
class InputRecord:
    """One valid input line."""

    line: int
    id: str
    messages: list[dict[str, str]]
    """The prompt: chat turns ending with a user turn."""
    reference: Any
    verifier: str
    data: dict[str, Any]
    """The whole JSON object as read."""

    @property
    def query(self) -> str:
        return self.messages[-1]["content"]

    def base_row(self, consumed: tuple[str, ...] = ()) -> dict[str, Any]:
        """Fields every output row starts with: the record, the carried fields present, and
        `meta` (all other input fields except `consumed` ones, which the pipeline rewrites)."""
        skip = (*KNOWN_FIELDS, *CARRIED_FIELDS, *DROPPED_FIELDS, *consumed)
        row = {
            "id": self.id,
            "line": self.line,
            "query": self.query,
            "messages": self.messages,
            "reference": self.reference,
            "verifier": self.verifier,
        }
        row.update({k: self.data[k] for k in CARRIED_FIELDS if k in self.data})
        row["meta"] = {k: v for k, v in self.data.items() if k not in skip}
        return row


def prompt_messages(obj: Any) -> list[dict[str, str]]:
    """The prompt turns of a record: its `messages` (ending with a user turn) or its `query`."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        validate_messages(messages)
        if messages[-1]["role"] != "user":
            raise ValueError("messages must end with a user turn")
        return messages
    if isinstance(obj.get("query"), str) and obj["query"].strip():
        return [{"role": "user", "content": obj["query"]}]
    raise ValueError("missing 'query' (a non-empty string) or 'messages'")


def _record(line: int, obj: Any, default_verifier: str) -> InputRecord:
    from kat_megatron.verifiers import VERIFIERS

    messages = prompt_messages(obj)
    rid = obj.get("id", f"line-{line}")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ValueError(f"'id' must be a string or integer, got {rid!r}")
    verifier = obj.get("verifier", default_verifier)
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; known: {sorted(VERIFIERS)}")
    return InputRecord(line, str(rid), messages, obj.get("reference"), verifier, obj)


def read_records(
    path: str | os.PathLike,
    default_verifier: str,
    check: Callable[[InputRecord], None] | None = None,
) -> tuple[list[InputRecord], list[dict[str, Any]]]:
    """Valid records and `[{line, reason}]` for malformed lines (bad UTF-8/JSON, missing fields,
    duplicate ids, or `check` raising ValueError)."""
    records: list[InputRecord] = []
    malformed: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                obj = json_line(raw)
                if obj is None:
                    raise ValueError("empty line")
                rec = _record(lineno, obj, default_verifier)
                if rec.id in seen:
                    raise ValueError(f"duplicate id {rec.id!r} (first on line {seen[rec.id]})")
                if check is not None:
                    check(rec)
            except (ValueError, UnicodeDecodeError) as err:
                malformed.append({"line": lineno, "reason": str(err)})
                continue
            seen[rec.id] = lineno
            records.append(rec)
    return records, malformed


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


class WorkLog:
    """Finished records of a run, appended one JSON line each (flushed and fsynced), keyed by id.

    A crash can tear the last line; it is dropped on load (that record is redone, its requests
    answered from the cache). `fingerprint` ties the log to a config: resuming with a different
    one is an error, `resume=False` starts a fresh log.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str, resume: bool) -> None:
        self.path = Path(directory) / "records.jsonl"
        meta = Path(directory) / "config_fingerprint"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and meta.exists() and meta.read_text().strip() != fingerprint:
            raise ValueError(
                f"{self.path.parent} holds a run with a different config; "
                "pass resume=false to start over (cached requests are kept)"
            )
        self.done: dict[str, dict[str, Any]] = {}
        if resume and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["id"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue
        atomic_write_text(self.path, _jsonl(self.done.values()))
        atomic_write_text(meta, fingerprint + "\n")
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            self.done[entry["id"]] = entry

    def close(self) -> None:
        self._file.close()


def _arrow_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with every key (missing ones None; `Dataset.from_list` reads the first row's keys
    only) and JSON_COLUMNS as JSON text."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [
        {
            k: json.dumps(r.get(k), ensure_ascii=False) if k in JSON_COLUMNS else r.get(k)
            for k in keys
        }
        for r in rows
    ]


def write_outputs(
    out_dir: str | os.PathLike,
    rows: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    summary: dict[str, Any],
    progress: bool = True,
) -> None:
    """dataset/ (`datasets.load_from_disk`), data.jsonl, rejected.jsonl and summary.json, each
    replaced atomically (the dataset is saved to a temporary directory and swapped in)."""
    import datasets
    from datasets.utils import logging as ds_logging

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".dataset."))
    bars = ds_logging.is_progress_bar_enabled()
    if not progress:
        ds_logging.disable_progress_bar()
    try:
        datasets.Dataset.from_list(_arrow_rows(rows)).save_to_disk(str(tmp / "dataset"))
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    final = out / "dataset"
    if final.exists():
        final.rename(tmp / "old")
    (tmp / "dataset").rename(final)
    shutil.rmtree(tmp)
    atomic_write_text(out / "data.jsonl", _jsonl(rows))
    atomic_write_text(out / "rejected.jsonl", _jsonl(rejected))
    atomic_write_text(
        out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    )


@dataclass
class LengthMeter:
    """Lengths in tokens of `tokenizer` (thread-safe), or in characters when it is None."""

    tokenizer: str | None = None
    _tok: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def unit(self) -> str:
        return "tokens" if self.tokenizer else "chars"

    def __call__(self, text: str) -> int:
        if not self.tokenizer:
            return len(text)
        with self._lock:
            if self._tok is None:
                from transformers import AutoTokenizer

                # `tiny` as in tokenizer.resolve_tokenizer_path, without importing Megatron-Core.
                path = TINY_DIR if self.tokenizer == "tiny" else Path(self.tokenizer)
                self._tok = AutoTokenizer.from_pretrained(str(path))
            return len(self._tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """count, mean, p50, p90, p99 and max of `values` (zeros when empty)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    stats = {"count": int(arr.size), "mean": round(float(arr.mean()), 2)}
    for q in (50, 90, 99):
        stats[f"p{q}"] = round(float(np.percentile(arr, q)), 2)
    stats["max"] = float(arr.max())
    return stats
