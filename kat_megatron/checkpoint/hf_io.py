"""Streaming safetensors I/O for `kat convert` (Hugging Face folders in and out).

`HFReader` reads one tensor (or one row of a stacked tensor) at a time with plain file reads:
no memory map, so resident memory holds only the tensors in use. `ShardedWriter` writes a
*planned* list of tensors: the plan (key, shape, dtype) fixes every shard's header before any
data, so each tensor is written the moment it is produced and then dropped. `atomic_dir` gives
an output folder that appears only once complete (written as `DIR.tmp`, then renamed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from math import prod
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where tensor data starts) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _bytes_view(t: torch.Tensor):
    """A writable/readable uint8 numpy view of contiguous tensor `t` (any dtype, even bf16)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class HFReader:
    """Lazy reader of a Hugging Face model folder's safetensors (one file, or shards + index)."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{self.dir}: {len(missing)} shard(s) listed in {INDEX} are missing: "
                    + ", ".join(missing[:4])
                    + (" ..." if len(missing) > 4 else "")
                )
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                bins = " (found PyTorch *.bin files: re-save with safetensors)"
                has_bin = any(self.dir.glob("*.bin"))
                raise FileNotFoundError(
                    f"{self.dir}: no *.safetensors weights" + (bins if has_bin else "")
                )
            weight_map = {}
        self._headers: dict[str, tuple[dict, int]] = {}
        for f in files:
            header, _ = self._file(f)
            if not index.is_file():
                weight_map.update(dict.fromkeys(header, f))
        self.weight_map: dict[str, str] = weight_map

    def _file(self, name: str) -> tuple[dict, int]:
        if name not in self._headers:
            self._headers[name] = _header(self.dir / name)
        return self._headers[name]

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _info(self, key: str) -> tuple[Path, dict, int]:
        if key not in self.weight_map:
            raise KeyError(f"{key}: not in {self.dir}")
        name = self.weight_map[key]
        header, start = self._file(name)
        if key not in header:
            raise ValueError(f"{key}: listed in {INDEX} for {name} but not in that file")
        return self.dir / name, header[key], start

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info(key)[1]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._info(key)[1]["dtype"]]

    def get(self, key: str, row: int | None = None) -> torch.Tensor:
        """Tensor `key` (or only its `row`-th entry along dim 0), read from disk into memory."""
        path, info, start = self._info(key)
        shape, (begin, end) = list(info["shape"]), info["data_offsets"]
        if row is not None:
            step = (end - begin) // shape[0]
            begin, end, shape = begin + row * step, begin + (row + 1) * step, shape[1:]
        t = torch.empty(shape, dtype=DTYPES[info["dtype"]])
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(_bytes_view(t)) != end - begin:
                raise ValueError(f"{key}: {path} is truncated")
        return t


def _header_bytes(entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, dtype in entries:
        n = prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardedWriter:
    """Streams a planned list of tensors into safetensors shards of at most `max_shard_bytes`.

    `write(key, tensor)` must follow the plan's order; `close()` writes the index (when there is
    more than one shard) and checks that the whole plan was written.
    """

    def __init__(
        self,
        out_dir: str | Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 5 * 2**30,
    ) -> None:
        self.dir = Path(out_dir)
        shards: list[list] = [[]]
        size = 0
        for entry in plan:
            n = prod(entry[1]) * entry[2].itemsize
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        total = len(shards)
        names = (
            ["model.safetensors"]
            if total == 1
            else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        )
        self.total_size = sum(prod(s) * d.itemsize for _, s, d in plan)
        self.weight_map = {e[0]: name for name, group in zip(names, shards) for e in group}
        self._todo = [(name, i == 0, i == len(g) - 1, e, g)
                      for name, g in zip(names, shards) for i, e in enumerate(g)]  # fmt: skip
        self._pos = 0
        self._file = None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._todo):
            raise ValueError(f"{key}: not in the export plan (all planned tensors are written)")
        name, first, last, (want, shape, dtype), group = self._todo[self._pos]
        if key != want:
            raise ValueError(f"export wrote {key} where the plan expects {want}")
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(
                f"{key}: shape {list(tensor.shape)} {tensor.dtype}, planned {list(shape)} {dtype}"
            )
        if first:
            self._file = open(self.dir / name, "wb")
            self._file.write(_header_bytes(group))
        self._file.write(_bytes_view(tensor.contiguous()).data)
        if last:
            self._file.close()
            self._file = None
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._todo):
            raise ValueError(f"export stopped before {self._todo[self._pos][3][0]}")
        if len(set(self.weight_map.values())) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """`out` as a Path; a ValueError when it exists and `overwrite` is off."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; remove it or pass --overwrite")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield `OUT.tmp` to write into; rename it to `OUT` only if the block completes."""
    out = check_output_dir(out, overwrite)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
