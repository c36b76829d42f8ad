"""Where canonical tensors come from: a Hugging Face folder or a kat checkpoint.

A source has `model` (the `ModelConfig` its tensors belong to) and `get(name)`, which returns
one canonical tensor (see `kat_megatron/checkpoint/__init__.py`) at a time. `HFSource.check()`
validates a folder before any rank starts: the architecture, every tensor the mapping needs
(missing ones and unexpected ones are listed), and every shape (naming the tensor).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Protocol

import torch

from kat_megatron.checkpoint.hf_config import HFSpec, model_config_from_hf
from kat_megatron.checkpoint.hf_io import HFReader
from kat_megatron.checkpoint.hf_mtp import MTP_DIR
from kat_megatron.checkpoint.mapping import from_hf, hf_shapes, is_mtp
from kat_megatron.checkpoint.mcore_io import McoreReader
from kat_megatron.config.schema import ModelConfig

log = logging.getLogger(__name__)

_PER_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$"
)
_FUSED = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class TensorSource(Protocol):
    model: ModelConfig

    def get(self, name: str) -> torch.Tensor: ...


class HFSource:
    """Canonical tensors assembled from a Hugging Face Qwen2 / Qwen3-MoE folder."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        self.model, self.spec, self.dtype = model_config_from_hf(hf_dir)
        files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
        self.tokenizer = (
            str(self.dir.resolve()) if any((self.dir / f).is_file() for f in files) else None
        )
        """The folder itself when it holds a tokenizer (recorded as the checkpoint's)."""
        self.reader = HFReader(hf_dir)
        self.mtp_reader = HFReader(self.dir / MTP_DIR) if self.model.mtp_num_layers else None
        """The MTP heads' tensors (`mtp/`, see checkpoint/hf_mtp.py), when the folder has them."""
        self.expected = hf_shapes(self.model, self.spec)

    @property
    def hf_spec(self) -> HFSpec:
        return self.spec

    def _fused(self, key: str) -> tuple[str, int, int | None] | None:
        """(fused key, expert, half) holding per-expert `key` in transformers-v5 layout."""
        m = _PER_EXPERT.match(key)
        if not m:
            return None
        prefix, e, which = m.group(1), int(m.group(2)), m.group(3)
        if which == "down":
            return f"{prefix}.down_proj", e, None
        return f"{prefix}.gate_up_proj", e, 0 if which == "gate" else 1

    def _reader(self, key: str) -> HFReader:
        return self.mtp_reader if is_mtp(key) and self.mtp_reader is not None else self.reader

    def _has(self, key: str) -> bool:
        if key in self._reader(key):
            return True
        fused = self._fused(key)
        return fused is not None and fused[0] in self.reader

    def check(self) -> None:
        """Raise ValueError/FileNotFoundError naming what does not match config.json."""
        missing = [k for k in self.expected if not self._has(k)]
        if missing:
            raise ValueError(
                f"{self.dir}: {len(missing)} tensor(s) required by config.json are missing, "
                f"e.g. {missing[:3]}"
            )
        tied = not self.model.untie_embeddings_and_output_weights
        extra = []
        keys = self.reader.keys() + (self.mtp_reader.keys() if self.mtp_reader else [])
        for key in keys:
            if key in self.expected or _FUSED.match(key) or _IGNORED.search(key):
                continue
            if key == "lm_head.weight" and tied:
                log.warning("%s: ignoring lm_head.weight (tie_word_embeddings=true)", self.dir)
                continue
            extra.append(key)
        if extra:
            raise ValueError(
                f"{self.dir}: {len(extra)} tensor(s) have no Megatron counterpart, e.g. {extra[:3]}"
            )
        for key, shape in self.expected.items():
            reader = self._reader(key)
            if key in reader and reader.shape(key) != shape:
                raise ValueError(
                    f"{key}: shape {list(reader.shape(key))} in {reader.dir}, "
                    f"but config.json implies {list(shape)}"
                )

    def read(self, key: str) -> torch.Tensor:
        """HF tensor `key` (per-expert keys also from fused `gate_up_proj`/`down_proj`)."""
        if key in self._reader(key):
            t = self._reader(key).get(key)
        else:
            fused = self._fused(key)
            if fused is None or fused[0] not in self.reader:
                raise ValueError(f"{key}: missing from {self.dir}")
            t = self.reader.get(fused[0], row=fused[1])
            if fused[2] is not None:
                t = t.chunk(2, dim=0)[fused[2]]
        want = self.expected.get(key)
        if want is not None and tuple(t.shape) != want:
            raise ValueError(
                f"{key}: shape {list(t.shape)} in {self.dir}, but config.json implies {list(want)}"
            )
        return t

    def get(self, name: str) -> torch.Tensor:
        return from_hf(name, self.read, self.model, self.spec)


class McoreSource:
    """Canonical tensors of a kat checkpoint (see `McoreReader`)."""

    def __init__(self, path: str | Path) -> None:
        self.reader = McoreReader(path)
        self.model = self.reader.model
        self.dtype = self.reader.dtype
        self.tokenizer = (self.reader.meta["config"].get("data") or {}).get("tokenizer")
        """The tokenizer the source checkpoint records (carried to the new one)."""

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name)
