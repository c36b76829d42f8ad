"""RL prompt records and the deterministic prompt sampler of `kat train` with `stage: rl`.

`python -c "from kat_megatron.rl.prompts import load_prompts; print(load_prompts('p.jsonl')[0])"`

`rl.prompts` is a JSONL file (one record per line) or a directory written by
`datasets.Dataset.save_to_disk` (a `DatasetDict` uses its `train` split). A record holds
`messages` (a chat ending with a user turn), `reference` (what the verifier checks against),
`verifier` (a name in `kat_megatron.verifiers.VERIFIERS`) and optionally `category` (metrics are
broken down by it; default "all") and `id`. Other fields are passed to the reward as metadata.
A malformed record is an error naming its line (JSONL) or index (dataset) and the field.

`PromptSampler` visits the records in a seeded permutation per epoch; its whole state is the
number of prompts drawn so far (`position`), which the checkpoint stores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kat_megatron.data.chat_template import chat_segments, validate_messages
from kat_megatron.data.tokenizer import encode_text
from kat_megatron.verifiers import VERIFIERS


@dataclass(frozen=True)
class PromptRecord:
    """One RL prompt: its chat, and what the reward needs to check an answer."""

    id: str
    messages: list[dict[str, str]]
    category: str
    meta: dict[str, Any] = field(default_factory=dict)
    """`reference`, `verifier` and every other field of the record except `messages`."""


def validate_record(rec: Any, where: str) -> PromptRecord:
    """A `PromptRecord` from one raw record; ValueError `'{where}: field: problem'` otherwise."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
    try:
        validate_messages(rec.get("messages"))
    except ValueError as err:
        raise ValueError(f"{where}: field 'messages': {err}") from None
    if rec["messages"][-1]["role"] != "user":
        raise ValueError(f"{where}: field 'messages': the last message must be a user turn")
    if rec.get("reference") is None:
        raise ValueError(f"{where}: field 'reference' is missing")
    verifier = rec.get("verifier")
    if not isinstance(verifier, str) or verifier not in VERIFIERS:
        raise ValueError(
            f"{where}: field 'verifier'={verifier!r}: expected one of {sorted(VERIFIERS)}"
        )
    category = rec.get("category")
    if category is None:
        category = "all"
    if not isinstance(category, str) or not category:
        raise ValueError(f"{where}: field 'category'={category!r}: expected a non-empty string")
    rid = rec.get("id")
    meta = {k: v for k, v in rec.items() if k != "messages"}
    return PromptRecord(
        id=str(rid) if rid is not None else where.rsplit(" ", 1)[-1],
        messages=[{"role": m["role"], "content": m["content"]} for m in rec["messages"]],
        category=category,
        meta=meta,
    )


def prompt_token_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Ids of `messages` rendered with the AutoThink chat template and its generation prompt
    (`...<|im_start|>assistant\n<judge>\n`), encoded piece by piece as SFT encodes chats."""
    pieces = chat_segments(messages, add_generation_prompt=True)
    return [t for text, _ in pieces for t in encode_text(tokenizer, text)]


def _read_jsonl(path: Path) -> list[PromptRecord]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}: record {len(records)}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: invalid JSON ({err.msg})") from None
            records.append(validate_record(rec, where))
    return records


def _read_dataset(path: Path) -> list[PromptRecord]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split ({list(ds)})")
        ds = ds["train"]
    return [validate_record(rec, f"{path}: record {i}") for i, rec in enumerate(ds)]


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Every record of `path` (JSONL file or saved `datasets` directory), validated."""
    path = Path(path)
    if path.is_dir():
        records = _read_dataset(path)
    elif path.is_file():
        records = _read_jsonl(path)
    else:
        raise FileNotFoundError(f"rl.prompts: {path} is neither a JSONL file nor a directory")
    if not records:
        raise ValueError(f"rl.prompts: {path} holds no records")
    return records


class PromptSampler:
    """Indices of prompts in a seeded order: epoch e visits `permutation(seed + e)`.

    `take(n)` returns the next n indices and advances `position`; the order depends only on
    (seed, shuffle, number of prompts), so a run resumed at `position` continues it exactly.
    """

    def __init__(self, num_prompts: int, seed: int, shuffle: bool = True, position: int = 0):
        if num_prompts < 1:
            raise ValueError("PromptSampler: no prompts")
        self.n, self.seed, self.shuffle, self.position = num_prompts, seed, shuffle, position
        self._epoch, self._order = -1, np.arange(num_prompts)

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            if self.shuffle:
                self._order = np.random.default_rng(self.seed + epoch).permutation(self.n)
            else:
                self._order = np.arange(self.n)
        return self._order

    def take(self, count: int) -> list[int]:
        out = []
        for pos in range(self.position, self.position + count):
            out.append(int(self._order_of(pos // self.n)[pos % self.n]))
        self.position += count
        return out
