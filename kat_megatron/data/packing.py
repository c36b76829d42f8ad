"""Pack tokenized SFT conversations into fixed-length rows with per-document boundaries.

`python -c "from kat_megatron.data.packing import *; help(pack_examples)"` documents the entry
point; the SFT trainer (`kat train` with `stage: sft`) consumes its output.

Convention (per document, independent of packing): a document of n tokens contributes n - 1
positions, `tokens = ids[:-1]`, `labels = ids[1:]`, `loss_mask = mask[1:]` (a position is trained
when the token it predicts is an assistant token: judge, mode, think, answer and the closing
`<|im_end|>`), `position_ids = 0 .. n-2`. Packing concatenates documents, so every slice
`cu_seqlens[i]:cu_seqlens[i+1]` of a row equals the unpacked document exactly, and no label
crosses a document boundary. The tail after the last document is padding (pad id, loss 0,
position 0, segment id -1). Attention must be restricted to each document: use `cu_seqlens` with
a varlen/THD kernel, or `attention_mask()` (block-diagonal causal) with a dense one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kat_megatron.data.chat_template import Message, chat_segments


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one conversation and, per token, whether it is an assistant (trained) token."""

    ids: tuple[int, ...]
    mask: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.mask):
            raise ValueError(f"ids ({len(self.ids)}) and mask ({len(self.mask)}) differ in length")


def _encode(tokenizer: Any, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize_chat(tokenizer: Any, messages: Sequence[Message]) -> TokenizedExample:
    """Tokenize a conversation with the AutoThink template; mark assistant-target tokens.

    Pieces are split at special tokens, which the tokenizer never merges across, so the ids
    equal `apply_chat_template(messages, tokenize=True)` (tested).
    """
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in chat_segments(messages):
        piece = _encode(tokenizer, text)
        ids.extend(piece)
        mask.extend([trained] * len(piece))
    return TokenizedExample(tuple(ids), tuple(mask))


@dataclass
class PackedSequence:
    """One packed row of `seq_length` positions (numpy arrays, shapes in the names)."""

    tokens_s: np.ndarray
    """int64 input ids."""
    labels_s: np.ndarray
    """int64 next-token targets within each document; pad id on padding."""
    loss_mask_s: np.ndarray
    """float32, 1.0 where the label is an assistant token."""
    position_ids_s: np.ndarray
    """int64, restarting at 0 for every document."""
    segment_ids_s: np.ndarray
    """int64 document index within the row; -1 on padding."""
    cu_seqlens: np.ndarray
    """int32 [n_docs + 1] document boundaries; cu_seqlens[-1] is the used length."""
    example_indices: list[int] = field(default_factory=list)
    """Indices into the `examples` given to `pack_examples`, in row order."""

    def attention_mask(self) -> np.ndarray:
        """bool [1, S, S], True where attention is *masked* (Megatron's convention): causal
        within each document; padding positions attend only to themselves."""
        seg = self.segment_ids_s
        s = len(seg)
        same = seg[:, None] == seg[None, :]
        causal = np.tril(np.ones((s, s), dtype=bool))
        allowed = same & causal & (seg[:, None] >= 0)
        allowed |= np.eye(s, dtype=bool)
        return ~allowed[None]


@dataclass
class PackResult:
    """Rows plus what could not be packed as given."""

    sequences: list[PackedSequence]
    truncated: int = 0
    """Documents longer than seq_length + 1 tokens cut to fit (overlong='truncate')."""
    dropped: list[int] = field(default_factory=list)
    """Indices of examples left out (overlong='drop', or fewer than 2 tokens)."""


def _bins_greedy(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Next-fit in input order: deterministic and order-preserving."""
    bins: list[list[int]] = []
    used = capacity
    for i, n in enumerate(lengths):
        if used + n > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


def _bins_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: fewer rows (less padding), order not preserved (ties by index)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = next((b for b, room in enumerate(free) if room >= n), None)
        if k is None:
            bins.append([])
            free.append(capacity)
            k = len(bins) - 1
        bins[k].append(i)
        free[k] -= n
    return bins


PACKERS: dict[str, Callable[[Sequence[int], int], list[list[int]]]] = {
    "greedy": _bins_greedy,
    "first_fit_decreasing": _bins_first_fit_decreasing,
}
"""Bin-packing strategies by name: (document lengths, capacity) -> lists of indices."""


def _fill_row(docs: list[TokenizedExample], seq_length: int, pad_id: int) -> PackedSequence:
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    positions = np.zeros(seq_length, dtype=np.int64)
    segments = np.full(seq_length, -1, dtype=np.int64)
    cu = [0]
    for k, doc in enumerate(docs):
        a, n = cu[-1], len(doc.ids) - 1
        ids = np.asarray(doc.ids, dtype=np.int64)
        tokens[a : a + n] = ids[:-1]
        labels[a : a + n] = ids[1:]
        loss_mask[a : a + n] = np.asarray(doc.mask[1:], dtype=np.float32)
        positions[a : a + n] = np.arange(n)
        segments[a : a + n] = k
        cu.append(a + n)
    return PackedSequence(
        tokens, labels, loss_mask, positions, segments, np.asarray(cu, dtype=np.int32)
    )


def pack_examples(
    examples: Sequence[TokenizedExample],
    seq_length: int,
    pad_id: int,
    strategy: str = "greedy",
    overlong: str = "truncate",
) -> PackResult:
    """Pack `examples` into rows of `seq_length` positions (see the module docstring).

    A document of n tokens needs n - 1 positions. Longer ones are cut to seq_length + 1 tokens
    (`overlong='truncate'`) or left out (`'drop'`); documents of fewer than 2 tokens are left
    out. `strategy` names a `PACKERS` entry.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}: expected >= 1")
    if strategy not in PACKERS:
        raise ValueError(f"unknown packing strategy {strategy!r}; known: {sorted(PACKERS)}")
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong={overlong!r}: expected 'truncate' or 'drop'")
    result = PackResult(sequences=[])
    kept: list[int] = []
    docs: list[TokenizedExample] = []
    for i, ex in enumerate(examples):
        if len(ex.ids) < 2 or (overlong == "drop" and len(ex.ids) - 1 > seq_length):
            result.dropped.append(i)
            continue
        if len(ex.ids) - 1 > seq_length:
            ex = TokenizedExample(ex.ids[: seq_length + 1], ex.mask[: seq_length + 1])
            result.truncated += 1
        kept.append(i)
        docs.append(ex)
    for bin_ in PACKERS[strategy]([len(d.ids) - 1 for d in docs], seq_length):
        row = _fill_row([docs[j] for j in bin_], seq_length, pad_id)
        row.example_indices = [kept[j] for j in bin_]
        result.sequences.append(row)
    return result
