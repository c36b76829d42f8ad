"""SFT data for `kat train CONFIG.yaml` with `stage: sft` (e.g. the output of `kat data coldstart`).

Reads chat records (`{"messages": [{"role": ..., "content": ...}, ...]}` per line) from the
`data.jsonl` files, tokenizes them with the AutoThink chat template (loss on assistant tokens:
judge, mode, think and answer), and packs them into rows of `data.seq_length` positions
(`kat_megatron/data/packing.py`), each sample carrying its document boundaries (`cu_seqlens`,
for THD `PackedSeqParams`: `data.packing`) or a dense per-document attention mask. Malformed lines are counted and
reported with file and line number; with none usable the build fails.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kat_megatron.config.schema import DataConfig
from kat_megatron.data.chat_template import validate_messages
from kat_megatron.data.packing import PackedSequence, pack_examples, tokenize_chat
from kat_megatron.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def read_chat_records(paths: list[str], key: str = "messages") -> tuple[list, list[str]]:
    """(conversations, problems): each problem names `file:line` and what was wrong."""
    convs, problems = [], []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    msgs = rec[key] if isinstance(rec, dict) else None
                    if msgs is None:
                        raise ValueError(f"expected an object with a {key!r} list")
                    validate_messages(msgs)
                except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
                    problems.append(f"{path}:{n}: {e}")
                    continue
                convs.append(msgs)
    return convs, problems


class PackedSFTDataset:
    """Packed rows as GPT-style samples (tokens, labels, loss_mask, position_ids) plus either
    `cu_seqlens` (int32 document boundaries, `thd=True`: `training/batches.py` turns them into
    `PackedSeqParams`) or `attention_mask` ([1, s, s] block-causal, True = masked)."""

    def __init__(self, rows: list[PackedSequence], thd: bool = False) -> None:
        self.rows = rows
        self.thd = thd

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        sample = {
            "tokens": torch.from_numpy(row.tokens_s),
            "labels": torch.from_numpy(row.labels_s),
            "loss_mask": torch.from_numpy(row.loss_mask_s.astype(np.float32)),
            "position_ids": torch.from_numpy(row.position_ids_s),
        }
        if self.thd:
            sample["cu_seqlens"] = torch.from_numpy(row.cu_seqlens)
        else:
            sample["attention_mask"] = torch.from_numpy(row.attention_mask())
        return sample


def build_sft_dataset(data: DataConfig, seed: int, thd: bool = False) -> PackedSFTDataset:
    """Tokenize, pack (first-fit decreasing) and shuffle (by `seed`) the chat records."""
    if not data.jsonl:
        raise ValueError("stage sft: set data.jsonl to chat-record JSONL files")
    paths = [str(p) for p in data.jsonl if not isinstance(p, (int, float))]
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"data.jsonl: {p} not found")
    convs, problems = read_chat_records(paths)
    if problems:
        shown = "\n  ".join(problems[:10])
        log.warning("skipped %d malformed chat record(s):\n  %s", len(problems), shown)
    if not convs:
        raise ValueError(f"data.jsonl: no usable chat records in {paths}")
    tok = load_tokenizer(data.tokenizer)
    examples = [tokenize_chat(tok, m) for m in convs]
    packed = pack_examples(
        examples, data.seq_length, pad_id=tok.pad_token_id or 0, strategy="first_fit_decreasing"
    )
    rows = packed.sequences
    random.Random(seed).shuffle(rows)
    log.info(
        "SFT data: %d conversations -> %d packed rows of %d (truncated %d, dropped %d, "
        "malformed %d)",
        len(convs), len(rows), data.seq_length, packed.truncated, len(packed.dropped),
        len(problems),
    )  # fmt: skip
    return PackedSFTDataset(rows, thd)
