"""Offline teacher top-K store for `kat train` stage kd (written by `kat kd dump-teacher`).

Usage:
    meta = TeacherTopKMeta(seq_length=4096, topk=64, vocab_size=152064, temperature=1.0,
                           tokenizer_fingerprint=tokenizer_fingerprint(tok), data_fingerprint=h)
    with TeacherTopKWriter(out_dir, meta) as w:       # one writer per rank: out_dir/part-R
        w.write(sample_indices_b, tokens_bs, ids_bsk, logprobs_bsk, residual_bs)
    merge_teacher_topk([part_0, part_1], out_dir)     # multi-rank dumps only
    reader = TeacherTopKReader(out_dir, tokenizer_fingerprint=..., data_fingerprint=h)
    batch = reader.batch(sample_indices_b, tokens_bs)  # TopKBatch -> TeacherTopK(**batch._asdict())

Format (version 1): a directory, published atomically (written as a hidden temp dir, renamed):
    header.json          format, version, seq_length, topk, vocab_size, temperature,
                         logprob_dtype (float16 | float32), tokenizer_fingerprint,
                         data_fingerprint, num_rows, order_sha256, shards [{"rows": n}], extra
    order.npy            int64 [num_rows]: dataset sample index of each row (the data order)
    token_hash.npy       uint64 [num_rows]: blake2b-64 of the row's input tokens (as <i8)
    ids.NNNNN.bin        int32 [rows, seq_length, topk], C order: global token ids
    logprobs.NNNNN.bin   logprob_dtype [rows, seq_length, topk]: log q at `temperature`, sorted
                         descending per position
    residual.NNNNN.bin   logprob_dtype [rows, seq_length]: log of the mass outside the top-K
                         (-inf when none)
Rows follow the shards in order. The reader memory-maps the .bin files and fails loudly when
the tokenizer, the data fingerprint, the expected order or a batch's tokens do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

FORMAT, VERSION = "kat-teacher-topk", 1
_ARRAYS = ("ids", "logprobs", "residual")


class TeacherTopKMismatch(ValueError):
    """The dump does not belong to this run (tokenizer, data, order or tokens differ)."""


@dataclass
class TeacherTopKMeta:
    """What a dump records about how it was made (`header.json` minus the bookkeeping)."""

    seq_length: int
    topk: int
    vocab_size: int
    temperature: float
    tokenizer_fingerprint: str
    data_fingerprint: str
    logprob_dtype: str = "float16"
    """float16 (half the disk; log-prob error <= ~0.4% of its value) or float32 (exact)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (teacher checkpoint, command line, ...)."""

    def __post_init__(self) -> None:
        if self.logprob_dtype not in ("float16", "float32"):
            raise ValueError(f"logprob_dtype={self.logprob_dtype!r}: float16 or float32")
        if not 1 <= self.topk <= self.vocab_size or self.seq_length < 1:
            raise ValueError(
                f"topk={self.topk}, vocab_size={self.vocab_size}, "
                f"seq_length={self.seq_length}: need 1 <= topk <= vocab_size"
            )


class TopKBatch(NamedTuple):
    """A batch read back, in the field names of `kat_megatron.losses.kd.TeacherTopK`."""

    ids_bsk: torch.Tensor
    logprobs_bsk: torch.Tensor
    residual_bs: torch.Tensor
    temperature: float


def token_hash(tokens_s: Any) -> int:
    """blake2b-64 of one sample's token ids (as little-endian int64), as an unsigned int."""
    data = np.ascontiguousarray(np.asarray(tokens_s), dtype="<i8").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _np(x: Any, dtype: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float() if x.is_floating_point() else x.detach().cpu()
        x = x.numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def _order_sha(order: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(order, dtype="<i8").tobytes()).hexdigest()


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out` (replacing an old `out` only when `overwrite`)."""
    old = None
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def _write_index(tmp: Path, meta: TeacherTopKMeta, order, hashes, shard_rows) -> None:
    order = np.asarray(order, dtype=np.int64)
    if len(np.unique(order)) != len(order):
        raise ValueError("a sample index was written twice")
    np.save(tmp / "order.npy", order)
    np.save(tmp / "token_hash.npy", np.asarray(hashes, dtype=np.uint64))
    header = {
        "format": FORMAT,
        "version": VERSION,
        **asdict(meta),
        "num_rows": int(len(order)),
        "order_sha256": _order_sha(order),
        "shards": [{"rows": r} for r in shard_rows],
    }
    (tmp / "header.json").write_text(json.dumps(header, indent=1) + "\n")


class TeacherTopKWriter:
    """Append rows in data order; `close()` (or leaving the `with`) publishes the directory."""

    def __init__(
        self, out_dir, meta: TeacherTopKMeta, rows_per_shard: int = 1024, overwrite: bool = False
    ) -> None:
        self.out, self.meta, self.rows_per_shard = Path(out_dir), meta, rows_per_shard
        self.overwrite = overwrite
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists (pass overwrite=True to replace it)")
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)
        self.order: list[int] = []
        self.hashes: list[int] = []
        self.shard_rows: list[int] = []
        self.files: dict[str, Any] = {}
        self.closed = False

    def _next_shard(self) -> None:
        self._close_files()
        i = len(self.shard_rows)
        self.files = {a: open(self.tmp / f"{a}.{i:05d}.bin", "wb") for a in _ARRAYS}
        self.shard_rows.append(0)

    def _close_files(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self.files = {}

    def write(self, sample_indices_b, tokens_bs, ids_bsk, logprobs_bsk, residual_bs) -> None:
        """Append one batch: b samples' indices, input tokens and teacher top-K at every position."""
        m = self.meta
        idx = _np(sample_indices_b, "<i8").reshape(-1)
        arrays = {
            "ids": _np(ids_bsk, "<i4"),
            "logprobs": _np(logprobs_bsk, m.logprob_dtype),
            "residual": _np(residual_bs, m.logprob_dtype),
        }
        b, s, k = len(idx), m.seq_length, m.topk
        want = {"ids": (b, s, k), "logprobs": (b, s, k), "residual": (b, s)}
        for name, arr in arrays.items():
            if arr.shape != want[name]:
                raise ValueError(f"{name}: shape {arr.shape}, expected {want[name]}")
        ids = arrays["ids"]
        if ids.min() < 0 or ids.max() >= m.vocab_size:
            raise ValueError(f"token ids outside [0, {m.vocab_size})")
        if k > 1 and (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any():
            raise ValueError("top-K ids repeat at some position (they must be unique)")
        self.order += idx.tolist()
        self.hashes += [token_hash(t) for t in _np(tokens_bs, "<i8").reshape(b, -1)]
        for r in range(b):
            if not self.files or self.shard_rows[-1] == self.rows_per_shard:
                self._next_shard()
            for name, arr in arrays.items():
                self.files[name].write(arr[r].tobytes())
            self.shard_rows[-1] += 1

    def close(self) -> Path:
        """Finish the shards, write the index and header, rename into place; returns the dir.

        On any error the temp directory is removed and nothing is published.
        """
        self.closed = True
        try:
            self._close_files()
            _write_index(self.tmp, self.meta, self.order, self.hashes, self.shard_rows)
            _publish(self.tmp, self.out, self.overwrite)
        except BaseException:
            self.abort()
            raise
        return self.out

    def abort(self) -> None:
        """Drop everything written (nothing is published)."""
        self.closed = True
        for f in self.files.values():
            f.close()
        self.files = {}
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> TeacherTopKWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_header(path: Path) -> dict[str, Any]:
    try:
        header = json.loads((path / "header.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a teacher top-K dump (no header.json)") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise TeacherTopKMismatch(
            f"{path}: format {header.get('format')!r} v{header.get('version')}, "
            f"expected {FORMAT!r} v{VERSION}"
        )
    return header


def merge_teacher_topk(parts: list, out_dir, overwrite: bool = False) -> Path:
    """Concatenate per-rank dumps (same meta) into one, in the given order; parts are consumed."""
    parts = [Path(p) for p in parts]
    headers = [_read_header(p) for p in parts]
    skip = ("num_rows", "order_sha256", "shards")
    same = [{k: v for k, v in h.items() if k not in skip} for h in headers]
    if any(s != same[0] for s in same):
        raise TeacherTopKMismatch(f"parts {parts} were dumped with different settings")
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    order, hashes, rows, n = [], [], [], 0
    for part, header in zip(parts, headers, strict=True):
        order.append(np.load(part / "order.npy"))
        hashes.append(np.load(part / "token_hash.npy"))
        for i, shard in enumerate(header["shards"]):
            for a in _ARRAYS:
                os.rename(part / f"{a}.{i:05d}.bin", tmp / f"{a}.{n:05d}.bin")
            rows.append(shard["rows"])
            n += 1
    meta = TeacherTopKMeta(**{k: v for k, v in same[0].items() if k not in ("format", "version")})
    _write_index(tmp, meta, np.concatenate(order), np.concatenate(hashes), rows)
    _publish(tmp, out, overwrite)
    for part in parts:
        shutil.rmtree(part)
    return out


class TeacherTopKReader:
    """Memory-mapped reader; every check that can fail does so here or in `batch`, loudly."""

    def __init__(
        self,
        path,
        *,
        tokenizer_fingerprint: str,
        data_fingerprint: str | None = None,
        expected_order: Any = None,
        vocab_size: int | None = None,
    ) -> None:
        self.path = Path(path)
        h = self.header = _read_header(self.path)
        checks = [
            ("tokenizer_fingerprint", tokenizer_fingerprint),
            ("data_fingerprint", data_fingerprint),
            ("vocab_size", vocab_size),
        ]
        for key, want in checks:
            if want is not None and h[key] != want:
                raise TeacherTopKMismatch(
                    f"teacher dump {self.path} has {key}={h[key]!r}, this run has {want!r}: "
                    "the dump was made for other data or another tokenizer; dump it again"
                )
        self.order = np.load(self.path / "order.npy")
        self.hashes = np.load(self.path / "token_hash.npy")
        if _order_sha(self.order) != h["order_sha256"] or len(self.order) != h["num_rows"]:
            raise TeacherTopKMismatch(f"{self.path}/order.npy does not match header.json")
        if expected_order is not None:
            exp = np.asarray(expected_order, dtype=np.int64)
            if exp.shape != self.order.shape or not np.array_equal(exp, self.order):
                diff = np.flatnonzero(exp[: len(self.order)] != self.order[: len(exp)])
                where = int(diff[0]) if len(diff) else min(len(exp), len(self.order))
                raise TeacherTopKMismatch(
                    f"teacher dump {self.path} holds {len(self.order)} samples in another order "
                    f"than this run's {len(exp)} (first difference at row {where})"
                )
        self._sorter = np.argsort(self.order, kind="stable")
        self._maps = [self._open_shard(i, s["rows"]) for i, s in enumerate(h["shards"])]
        self._starts = np.cumsum([0] + [s["rows"] for s in h["shards"]])

    @property
    def temperature(self) -> float:
        return float(self.header["temperature"])

    @property
    def topk(self) -> int:
        return int(self.header["topk"])

    def __len__(self) -> int:
        return int(self.header["num_rows"])

    def _open_shard(self, i: int, rows: int) -> dict[str, np.memmap]:
        s, k, dt = self.header["seq_length"], self.header["topk"], self.header["logprob_dtype"]
        shapes = {"ids": (rows, s, k), "logprobs": (rows, s, k), "residual": (rows, s)}
        dtypes = {"ids": "<i4", "logprobs": dt, "residual": dt}
        maps = {}
        for a in _ARRAYS:
            f = self.path / f"{a}.{i:05d}.bin"
            need = int(np.prod(shapes[a])) * np.dtype(dtypes[a]).itemsize
            if not f.exists() or f.stat().st_size != need:
                raise TeacherTopKMismatch(f"{f} is missing or truncated ({need} bytes expected)")
            maps[a] = np.memmap(f, dtype=dtypes[a], mode="r", shape=shapes[a])
        return maps

    def rows(self, sample_indices: Any) -> np.ndarray:
        """Row number of each dataset sample index; unknown samples fail."""
        idx = np.asarray(sample_indices, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self.order, idx, sorter=self._sorter)
        pos = np.minimum(pos, len(self.order) - 1)
        rows = self._sorter[pos]
        missing = idx[self.order[rows] != idx]
        if len(missing):
            raise TeacherTopKMismatch(
                f"samples {missing[:8].tolist()} are not in teacher dump {self.path} "
                f"({len(self.order)} samples): it was made for other data or fewer steps"
            )
        return rows

    def batch(self, sample_indices_b: Any, tokens_bs: Any = None) -> TopKBatch:
        """Teacher top-K for these samples (`[b, s, K]`); `tokens_bs` verifies the tokens."""
        rows = self.rows(sample_indices_b)
        if tokens_bs is not None:
            for j, (r, toks) in enumerate(zip(rows, _np(tokens_bs, "<i8"), strict=True)):
                if token_hash(toks) != int(self.hashes[r]):
                    raise TeacherTopKMismatch(
                        f"sample {int(self.order[r])} (batch row {j}): its tokens differ from "
                        f"the ones teacher dump {self.path} was made from"
                    )
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        out = {a: [] for a in _ARRAYS}
        for r, i in zip(rows, shard, strict=True):
            for a in _ARRAYS:
                out[a].append(np.asarray(self._maps[i][a][r - self._starts[i]]))
        return TopKBatch(
            torch.from_numpy(np.stack(out["ids"]).astype(np.int64)),
            torch.from_numpy(np.stack(out["logprobs"]).astype(np.float32)),
            torch.from_numpy(np.stack(out["residual"]).astype(np.float32)),
            self.temperature,
        )
