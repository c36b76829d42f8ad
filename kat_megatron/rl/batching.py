"""Rollouts -> training micro-batches for `kat train` with `stage: rl`.

A rollout of prompt ids p (P tokens) and response ids r (R tokens) is one causal-LM row over
ids = p + r: `tokens = ids[:-1]`, `labels = ids[1:]`, positions 0..P+R-2. The labels at
positions P-1 .. P+R-2 are the response tokens: there `loss_mask` is 1 and the per-token
advantages, rollout log-probs and reference log-probs are placed; elsewhere they are 0.
Rows are right-padded (causal attention never looks at the padding) to the longest row of their
micro-batch, rounded up to a multiple of `pad_multiple` (which the sequence-parallel split over
TP needs).

With `packed` (`rl.packing`, verl's remove-padding) the model input is instead one THD row: the
micro-batch's rows concatenated without padding, `tokens/labels/position_ids [1, t]` with
t = sum of row lengths rounded up to `pad_multiple` (a dummy document of padding at the tail),
and `packed_seq_params` (`kat_megatron/models/packed_seq.py`); positions restart per rollout.
The per-token loss inputs (`loss_mask`, `advantages`, log-probs) keep the padded `[b, s]` layout
above, and `valid` (bool `[b, s]`, the rows' real positions in row-major order = the order of
the packed row) maps the packed per-token outputs back (`unpack`), so the loss sees exactly the
padded path's tensors (zeros instead of padding garbage where `loss_mask` is 0).

Each data-parallel rank trains on the rollouts it generated; all ranks run the same number of
micro-batches (the largest any rank needs), slots past a rank's last rollout hold an all-padding
row without loss. The loss is normalised over the global batch by Megatron-Core
(`calculate_per_token_loss`), so how rollouts spread over ranks does not change the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kat_megatron.models.packed_seq import close_row
from kat_megatron.rl import router_replay


@dataclass
class RolloutSample:
    """One trained rollout (lists of equal length R for the response)."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantages: list[float]
    """Per response token (judge tokens and the rest may differ: Step-SRPO)."""
    rollout_logprobs: list[float]
    """The engine's log p of each response token when it sampled it."""
    ref_logprobs: list[float] | None = None
    """The frozen reference model's log p of each response token (KL terms)."""
    old_logprobs: list[float] | None = None
    """The trained policy's log p before this step's first update (rl.ppo_epochs /
    rl.mini_batches > 1); None: the training forward's own detached values."""
    routing: Any = None
    """MoE router replay: the experts the engine routed each input position to, `[L,
    num_positions, k]` (`rl/router_replay.py`); None: the training forward routes itself."""

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        for name in ("advantages", "rollout_logprobs", "ref_logprobs", "old_logprobs"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"RolloutSample.{name}: {len(value)} values for {n} tokens")
        if not self.prompt_ids:
            raise ValueError("RolloutSample: empty prompt")
        if self.routing is not None and self.routing.shape[1] != self.num_positions:
            raise ValueError(
                f"RolloutSample.routing: {self.routing.shape[1]} positions for {self.num_positions}"
            )

    @property
    def num_positions(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids) - 1


def pad_multiple_for(tp: int) -> int:
    """Row lengths are multiples of lcm(16, tp): TP-divisible, and the same for TP <= 16."""
    return 16 * tp // math.gcd(16, tp)


def collate_rollouts(
    samples: list[RolloutSample | None],
    pad_id: int,
    pad_multiple: int,
    with_ref: bool = False,
    with_old: bool = False,
    packed: bool = False,
) -> dict:
    """Tensors `[b, s]` of one micro-batch (None entries are all-padding rows without loss);
    `ref_logprobs` / `old_logprobs` only when asked for (every real sample must have them);
    `packed`: the model input as one THD row (module docstring)."""
    real = [s.num_positions for s in samples if s is not None]
    length = max(real, default=1)
    length = -(-length // pad_multiple) * pad_multiple
    b = len(samples)
    out = {
        "tokens": torch.full((b, length), pad_id, dtype=torch.long),
        "labels": torch.full((b, length), pad_id, dtype=torch.long),
        "position_ids": torch.arange(length).unsqueeze(0).repeat(b, 1),
        "loss_mask": torch.zeros(b, length),
        "advantages": torch.zeros(b, length),
        "rollout_logprobs": torch.zeros(b, length),
    }
    extra = [n for n, on in (("ref_logprobs", with_ref), ("old_logprobs", with_old)) if on]
    for name in extra:
        out[name] = torch.zeros(b, length)
    routings = [s.routing if s is not None else None for s in samples]
    if any(r is not None for r in routings):
        if any(r is None for r, s in zip(routings, samples) if s is not None):
            raise ValueError("collate_rollouts: router replay needs the routing of every sample")
        out["routing"] = router_replay.collate(routings, length)
    for i, s in enumerate(samples):
        if s is None:
            continue
        ids = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        n, start, r = len(ids) - 1, len(s.prompt_ids) - 1, len(s.response_ids)
        out["tokens"][i, :n] = ids[:-1]
        out["labels"][i, :n] = ids[1:]
        out["loss_mask"][i, start : start + r] = 1.0
        out["advantages"][i, start : start + r] = torch.tensor(s.advantages)
        out["rollout_logprobs"][i, start : start + r] = torch.tensor(s.rollout_logprobs)
        for name in extra:
            values = getattr(s, name)
            if values is None:
                raise ValueError(f"collate_rollouts: a sample lacks {name}")
            out[name][i, start : start + r] = torch.tensor(values)
    return pack_rollouts(out, samples, pad_id, pad_multiple) if packed else out


def pack_rollouts(
    out: dict, samples: list[RolloutSample | None], pad_id: int, pad_multiple: int
) -> dict:
    """The padded micro-batch `out` with its model input replaced by one THD row."""
    lengths = [s.num_positions for s in samples if s is not None]
    valid = torch.zeros_like(out["loss_mask"], dtype=torch.bool)
    for i, s in enumerate(samples):
        if s is not None:
            valid[i, : s.num_positions] = True
    n = sum(lengths)
    # padding to the TP multiple: a dummy document without loss
    t, out["position_ids"], out["packed_seq_params"] = close_row(lengths, n, pad_multiple)
    for key in ("tokens", "labels"):
        packed = torch.full((t,), pad_id, dtype=torch.long)
        packed[:n] = out[key][valid]
        out[key] = packed.unsqueeze(0)
    out["valid"] = valid
    if "routing" in out:
        out["routing"] = router_replay.pack(out["routing"], valid, t)
    return out


def unpack(values_1t: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-token values of the model's output `[1, t]` in the padded `[b, s]` layout (0 at
    padding; differentiable); a padded batch's `[b, s]` values unchanged."""
    valid = batch.get("valid")
    if valid is None:
        return values_1t
    n = int(valid.sum())
    return values_1t.new_zeros(valid.shape).masked_scatter(valid, values_1t[0, :n])


def num_microbatches(num_samples: int, mbs: int) -> int:
    """Micro-batches for `num_samples` rollouts (at least one)."""
    return max(1, -(-num_samples // mbs))


def microbatches(
    samples: list[RolloutSample],
    mbs: int,
    n_micro: int,
    pad_id: int,
    pad_multiple: int,
    with_ref: bool = False,
    with_old: bool = False,
    packed: bool = False,
) -> list[dict]:
    """`n_micro` micro-batches of `mbs` rows from this rank's rollouts, in order; slots past
    the last rollout are all-padding rows (every DP rank must run the same number of
    micro-batches, whatever its number of rollouts)."""
    if len(samples) > n_micro * mbs:
        raise ValueError(f"{len(samples)} rollouts do not fit {n_micro} x {mbs} rows")
    slots: list[RolloutSample | None] = list(samples) + [None] * (n_micro * mbs - len(samples))
    return [
        collate_rollouts(
            slots[k * mbs : (k + 1) * mbs], pad_id, pad_multiple, with_ref, with_old, packed
        )
        for k in range(n_micro)
    ]


def response_values(
    values_bs: torch.Tensor, samples: list[RolloutSample | None]
) -> list[list[float] | None]:
    """Per sample, the response-token entries of a `[b, s]` tensor laid out by
    `collate_rollouts` (e.g. reference log-probs from `forward_logprobs`)."""
    out: list[list[float] | None] = []
    for i, s in enumerate(samples):
        if s is None:
            out.append(None)
            continue
        start = len(s.prompt_ids) - 1
        out.append(values_bs[i, start : start + len(s.response_ids)].tolist())
    return out
