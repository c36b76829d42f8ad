"""THD packing: several documents in one row, attention per document through Megatron-Core's
`PackedSeqParams` (`kat train cfg.yaml data.packing=true`, `rl.packing=true`; docs/attention.md).

Convention (Megatron-Core's THD): a micro-batch is one row, batch 1, `tokens [1, t]`, the
documents concatenated; `cu_seqlens_q == cu_seqlens_kv` (int32 `[n_docs + 1]`) are their
boundaries and must end at t (Megatron-Core's thd RoPE splits the row by them), and
`max_seqlen_q/kv` is the longest document. Several rows of a micro-batch (SFT's packed rows with
`training.micro_batch_size > 1`) are concatenated into that one row: each keeps its documents,
and its padding tail becomes one more document (pad tokens, no loss, attending only to padding).
The row is padded to a multiple of `multiple` (the TP size: sequence parallelism splits it) with
one more such dummy document. Positions restart at 0 in every document: Megatron-Core's RoPE does
that from `cu_seqlens` (case "max_seqlen" of `_apply_rotary_pos_emb_thd`), and `position_ids`
(used by learned absolute embeddings only) are built to match.

Who consumes the params: the local backend's `SDPAttention` (models/attention.py, one causal SDPA
call per document; tested) and, with `model.backend=te`, Transformer Engine's
`TEDotProductAttention` through Megatron-Core's own thd path: the same object, no TE-specific
field is set here (TE is not installable on the CPU test machine, so that branch is untested).
`model.attention=unfused` (Megatron-Core's `DotProductAttention`) ignores the params, which is why
packing with it is refused (`packing_enabled`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from kat_megatron.config.schema import ModelConfig


def packing_enabled(flag: bool | None, model: ModelConfig, key: str) -> bool:
    """Whether to pack (`flag`, None: where the attention honours THD params); a one-line
    ValueError naming `key` when packing is asked of an attention that cannot honour it."""
    from kat_megatron.models.builder import te_available

    te = model.backend == "te" or (model.backend == "auto" and te_available())
    honours = te or model.attention == "sdpa"
    if flag is None:
        return honours
    if flag and not honours:
        raise ValueError(
            f"{key}=true needs an attention that honours THD packed_seq_params: "
            "model.attention=unfused takes a dense mask only; set model.attention=sdpa or "
            f"{key}=false"
        )
    return bool(flag)


def padded_length(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (at least `multiple`)."""
    return max(1, -(-n // multiple)) * multiple


def thd_params(lengths: Sequence[int], device: torch.device | None = None) -> PackedSeqParams:
    """`PackedSeqParams` of one row holding documents of `lengths` tokens, in order."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"thd_params: document lengths must be >= 1, got {list(lengths)}")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).to(cu)
    longest = int(max(lengths))
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def positions_of(lengths: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """int64 `[sum(lengths)]`: 0 .. n-1 for every document."""
    return torch.cat([torch.arange(n, device=device) for n in lengths])


def close_row(
    lengths: Sequence[int], used: int, multiple: int, device: torch.device | None = None
) -> tuple[int, torch.Tensor, PackedSeqParams]:
    """One THD row's documents `lengths` (`used` tokens in all), closed with one dummy document
    up to t = `used` rounded up to `multiple`: `(t, position_ids [1, t], packed_seq_params)`."""
    t = padded_length(used, multiple)
    if t > used:
        lengths = [*lengths, t - used]
    return t, positions_of(lengths, device).unsqueeze(0), thd_params(lengths, device=device)


def pack_rows(
    batch: dict[str, torch.Tensor], cu_seqlens: Sequence, multiple: int, pad_id: int = 0
) -> dict:
    """`[b, s]` packed rows (tokens, labels, loss_mask, position_ids) with each row's document
    boundaries `cu_seqlens[i]` (`cu[-1]` = its used length) -> one THD row `[1, t]` and its
    `packed_seq_params` (module docstring); t = b * s rounded up to `multiple`."""
    b, s = batch["tokens"].shape
    lengths: list[int] = []
    for cu in cu_seqlens:
        cu = [int(x) for x in cu]
        lengths += [z - a for a, z in zip(cu[:-1], cu[1:]) if z > a]
        if cu[-1] < s:
            lengths.append(s - cu[-1])  # the row's padding tail: a dummy document
    t, positions, params = close_row(lengths, b * s, multiple)
    out = {}
    for key, fill in (("tokens", pad_id), ("labels", pad_id), ("loss_mask", 0)):
        flat = batch[key].reshape(-1)
        out[key] = torch.cat([flat, flat.new_full((t - b * s,), fill)]).unsqueeze(0)
    out["position_ids"] = positions
    out["packed_seq_params"] = params
    return out


def eod_lengths(row: Sequence[int], eod_id: int) -> list[int]:
    """Document lengths of one row of EOD-joined documents: every EOD ends its document (the EOD
    belongs to it) and the row's end ends one."""
    lengths, start = [], 0
    for i, tok in enumerate(row):
        if tok == eod_id:
            lengths.append(i + 1 - start)
            start = i + 1
    if start < len(row):
        lengths.append(len(row) - start)
    return lengths


def eod_rows(tokens_bs: torch.Tensor, eod_id: int, multiple: int) -> dict:
    """Pretraining rows `[b, s]` of EOD-joined documents (stage kd with `kd.packing`) -> the
    model input of one THD row: `tokens [1, t]`, `position_ids [1, t]`, `packed_seq_params`,
    and `rows` = (b, s) for `unpack_heads`. Every EOD ends its document (the EOD belongs to it,
    as `losses.kd.documents_from_eod` counts), every row's end ends one; t = b * s rounded up
    to `multiple`, the tail one more document of EOD tokens."""
    b, s = tokens_bs.shape
    lengths = [n for row in tokens_bs.tolist() for n in eod_lengths(row, eod_id)]
    t, positions, params = close_row(lengths, b * s, multiple, tokens_bs.device)
    flat = tokens_bs.reshape(-1)
    tokens = torch.cat([flat, flat.new_full((t - b * s,), eod_id)]).unsqueeze(0)
    return {
        "tokens": tokens,
        "position_ids": positions,
        "packed_seq_params": params,
        "rows": (b, s),
    }


def unpack_heads(logits_t1v: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
    """One head's logits of an `eod_rows` THD row, `[t, 1, V]` -> the rows' `[s, b, V]`."""
    b, s = rows
    return logits_t1v[: b * s, 0].reshape(b, s, -1).transpose(0, 1)
