"""Deterministic batching for `kat train`: which samples each data-parallel rank reads per step.

The order is Megatron-LM's pretraining sampler: the global batch of step s holds samples
[c, c + global_batch) where c = consumed samples; micro-batch k of DP rank r holds
c + k * mbs * dp + r * mbs + [0, mbs). The union over ranks is the same for any DP size, which is
what makes DP=2 runs numerically comparable to DP=1, and resuming needs only `consumed_samples`.

Samples with `cu_seqlens` (stage sft's packed rows with `data.packing`) become one THD row per
micro-batch, `[1, mbs * s]` rounded up to `multiple`, with `packed_seq_params`
(`kat_megatron/models/packed_seq.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from kat_megatron.models.packed_seq import pack_rows


def microbatch_indices(
    consumed: int, global_batch: int, mbs: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    """Sample indices of each micro-batch that DP rank `dp_rank` reads in one step."""
    if global_batch % (mbs * dp_size):
        raise ValueError(
            f"training.global_batch_size={global_batch} is not a multiple of "
            f"micro_batch_size * data-parallel size = {mbs} * {dp_size}"
        )
    n_micro = global_batch // (mbs * dp_size)
    return [
        [consumed + k * mbs * dp_size + dp_rank * mbs + j for j in range(mbs)]
        for k in range(n_micro)
    ]


def collate(samples: Sequence[dict], multiple: int = 1) -> dict:
    """Stack the dataset's per-sample dicts into [mbs, ...] tensors (ids as int64, the loss mask
    as float; an `attention_mask` [1, s, s] per sample becomes [mbs, 1, s, s]); samples with
    `cu_seqlens` become one THD row (module docstring) of a multiple of `multiple` tokens."""
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask"):
        if key not in samples[0]:
            continue
        vals = [s[key] for s in samples]
        out[key] = torch.stack(
            [v if torch.is_tensor(v) else torch.from_numpy(np.asarray(v)) for v in vals]
        )
    for key in ("tokens", "labels", "position_ids"):
        out[key] = out[key].long()
    out["loss_mask"] = out["loss_mask"].float()
    if "cu_seqlens" in samples[0]:
        return pack_rows(out, [s["cu_seqlens"] for s in samples], multiple)
    return out


def step_batches(
    dataset,
    consumed: int,
    global_batch: int,
    mbs: int,
    dp_rank: int,
    dp_size: int,
    multiple: int = 1,
) -> Iterator[dict]:
    """Iterator over this rank's micro-batches for one step (wraps around the dataset)."""
    n = len(dataset)
    for idx in microbatch_indices(consumed, global_batch, mbs, dp_rank, dp_size):
        yield collate([dataset[i % n] for i in idx], multiple)
