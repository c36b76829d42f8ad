"""Static memory of one rank (parameters, gradients, optimizer state) for `kat plan` and `kat train`.

Reproduces Megatron-Core 0.16.1's allocation rules for the DDP and optimizer set-up of
`kat_megatron.training.optimizer` (one DDP per model chunk; `grad_reduce_in_fp32` from
`optimizer.grad_reduce_dtype`: fp32 gradient buffers, or bf16 ones beside bf16 parameters):

- `distributed/param_and_grad_buffer.py` (`_ParamAndGradBuffer`): per chunk, one buffer for
  dense parameters and one for expert-parallel ones (EP > 1), each reduced over its own data-
  parallel group (dense: DP x CP; experts: world / (ETP x EP x PP)). Parameters are laid out in
  reverse `named_parameters()` order. With the distributed optimizer each parameter starts at a
  multiple of 64 elements and each bucket ends at a multiple of lcm(DP, 128); a `shared_embedding`
  parameter gets a bucket of its own; without it nothing is padded. Buckets split at
  `bucket_size` = max(4e7, 1e6 x DP) elements only with `overlap_grad_reduce`, and only in the
  first chunk of the first pipeline rank. Gradients live in the buffer (`grad_bytes`); with the
  distributed optimizer parameters do too (a padded param buffer replaces each `param.data`).
- `optimizer/distrib_optimizer.py`: DP rank r owns elements [r*S, (r+1)*S) of every bucket
  (S = bucket size / DP); for the parameter elements in that range it keeps an fp32 main copy
  (16-bit parameters only) and Adam's exp_avg and exp_avg_sq (fp32). Padding gets no state.
- `optimizer/optimizer.py` (`Float16OptimizerWithFloat16Params`, `FP32Optimizer`): without the
  distributed optimizer every rank keeps fp32 main copies (16-bit parameters) and both moments
  for all its parameters.

Per parameter that is 2 + 4 + 12/DP bytes with bf16 and the distributed optimizer (2 + 2 + 12/DP
with bf16 gradients), 18 without (16).

FP8 (`model.fp8`): every FP8 linear weight adds its FP8 copy and transpose (2 bytes). With FP8
primary weights (`model.fp8_param`, DDP `fp8_param_gather`) Megatron-Core's DDP puts those
weights in a buffer of their own with dtype uint8 (`distributed_data_parallel.py` groups by
(param dtype, grad dtype)): 1 byte per parameter element instead of 2, and TE caches only the
transpose (1 byte): 2 bytes per FP8 element fewer than bf16 weights with FP8 compute. That
buffer's own end padding (< lcm(DP, 128) elements) is not counted.
With explicit `dp_rank`s the count is exact for that rank; without, each shard is its full size
S (an upper bound that differs from the exact count by the padding inside one shard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kat_megatron.config.schema import ModelConfig
from kat_megatron.planning.inventory import Group, ParamSpec, expand, stage_inventory
from kat_megatron.planning.layout import Layout

GRAD_BYTES = {"fp32": 4, "bf16": 2}
"""Bytes per gradient element for `optimizer.grad_reduce_dtype`."""
MOMENT_BYTES = 8  # Adam exp_avg + exp_avg_sq, fp32


@dataclass
class StaticMemory:
    """Bytes one rank holds for parameters, gradients and optimizer state."""

    params_bytes: int = 0
    grad_bytes: int = 0
    main_param_bytes: int = 0
    """fp32 master copies of 16-bit parameters (0 for fp32 training)."""
    moment_bytes: int = 0
    """Adam exp_avg + exp_avg_sq."""
    numel: int = 0
    """Parameters on this rank (unpadded)."""
    dense_buffer_numel: int = 0
    expert_buffer_numel: int = 0
    """Elements of the DDP buffers (padded), reduced over DP x CP and expert-DP respectively."""
    fp8_weight_bytes: int = 0
    """`model.fp8`: Transformer Engine's FP8 copies of the linear weights, cached for the whole
    step (Megatron-Core passes `is_first_microbatch`): the FP8 weight and, on Hopper, its FP8
    transpose for the backward GEMMs, 2 bytes per element beside the bf16 parameter. With
    `model.fp8_param` the parameter itself is the FP8 weight (1 byte, in `params_bytes`) and
    only the transpose is cached: 1 byte per element."""

    @property
    def optimizer_bytes(self) -> int:
        return self.main_param_bytes + self.moment_bytes

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grad_bytes + self.optimizer_bytes + self.fp8_weight_bytes

    def __add__(self, other: StaticMemory) -> StaticMemory:
        return StaticMemory(
            *(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__)
        )


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class BufferLayout:
    """Element ranges of a DDP buffer: per parameter (in parameter order) and per bucket."""

    ranges: list[tuple[int, int]]
    buckets: list[tuple[int, int]]

    @property
    def numel(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0


def buffer_layout(
    params: list[ParamSpec], dp: int, distributed_optimizer: bool, bucket_size: int | None
) -> BufferLayout:
    """Megatron-Core's `_ParamAndGradBuffer` index arithmetic for `params` (named order)."""
    lcm = math.lcm(dp, 128)

    def pad_end(i: int) -> int:
        return _pad(i, lcm) if distributed_optimizer else i

    ranges: list[tuple[int, int]] = [(0, 0)] * len(params)
    buckets: list[tuple[int, int]] = []
    start = bucket_start = end = 0
    in_bucket = 0
    for j in reversed(range(len(params))):
        p = params[j]
        start = _pad(start, 64) if distributed_optimizer else start
        own_bucket = p.shared_embedding and distributed_optimizer
        if own_bucket and in_bucket:
            start = pad_end(start)
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
        end = start + p.numel
        ranges[j] = (start, end)
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own_bucket:
            start = pad_end(end)
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
        else:
            start = end
    if in_bucket:
        buckets.append((bucket_start, pad_end(end)))
    return BufferLayout(ranges, buckets)


def _owned(layout: BufferLayout, dp: int, rank: int) -> int:
    """Parameter elements in DP rank `rank`'s shard of every bucket (padding excluded)."""
    owned = 0
    for b0, b1 in layout.buckets:
        size = (b1 - b0) // dp
        lo, hi = b0 + rank * size, b0 + (rank + 1) * size
        for s, e in layout.ranges:
            owned += max(0, min(e, hi) - max(s, lo))
    return owned


def _fast_numel(groups: list[Group], dp: int, distributed_optimizer: bool) -> tuple[int, int, int]:
    """(buffer numel, max shard elements, unpadded numel) without bucketing, from groups."""
    numel = sum(g.numel for g in groups)
    if not distributed_optimizer:
        return numel, numel, numel
    lcm = math.lcm(dp, 128)
    shared = [p.numel for g in groups for p in g.params if p.shared_embedding]
    rest = sum(g.count * sum(_pad(p.numel, 64) for p in g.params) for g in groups)
    rest -= sum(_pad(n, 64) for n in shared)
    buckets = ([_pad(rest, lcm)] if rest else []) + [_pad(n, lcm) for n in shared]
    return sum(buckets), sum(b // dp for b in buckets), numel


def _buffer_memory(
    groups: list[Group],
    dp: int,
    param_bytes: int,
    distributed_optimizer: bool,
    bucket_size: int | None,
    dp_rank: int | None,
    expert: bool = False,
    grad_bytes: int = 4,
) -> StaticMemory:
    """Static memory of one DDP buffer (its parameters given as groups)."""
    if not groups:
        return StaticMemory()
    if bucket_size is None and dp_rank is None:
        buf, owned, numel = _fast_numel(groups, dp, distributed_optimizer)
    else:
        params = expand(groups)
        layout = buffer_layout(params, dp, distributed_optimizer, bucket_size)
        numel = sum(p.numel for p in params)
        buf = layout.numel
        if not distributed_optimizer:
            owned = numel
        elif dp_rank is None:
            owned = sum((b1 - b0) // dp for b0, b1 in layout.buckets)
        else:
            owned = _owned(layout, dp, dp_rank)
    return StaticMemory(
        params_bytes=(buf if distributed_optimizer else numel) * param_bytes,
        grad_bytes=buf * grad_bytes,
        main_param_bytes=owned * 4 if param_bytes < 4 else 0,
        moment_bytes=owned * MOMENT_BYTES,
        numel=numel,
        dense_buffer_numel=0 if expert else buf,
        expert_buffer_numel=buf if expert else 0,
    )


def _split(chunk: list[Group]) -> tuple[list[Group], list[Group]]:
    """(dense groups, expert groups) of a chunk: the two DDP buffers."""
    dense, experts = [], []
    for g in chunk:
        d = tuple(p for p in g.params if not p.expert)
        e = tuple(p for p in g.params if p.expert)
        if d:
            dense.append(Group(g.prefix, d, g.count, g.first))
        if e:
            experts.append(Group(g.prefix, e, g.count, g.first))
    return dense, experts


FP8_LINEARS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
"""Weights of the layers Transformer Engine runs in FP8 (decoder and MTP layers; the router,
the embedding and the output layer stay in bf16; MTP's `eh_proj` is left out, one h x 2h)."""
FP8_WEIGHT_BYTES = 2  # FP8 data + FP8 transpose (Hopper has no non-TN FP8 GEMM)
FP8_PARAM_CACHE_BYTES = 1  # fp8_param: the parameter is the FP8 data; the transpose is cached


def _fp8_numel(chunk: list[Group]) -> int:
    return sum(
        g.count * sum(p.numel for p in g.params if p.name.endswith(FP8_LINEARS)) for g in chunk
    )


def static_memory(
    model: ModelConfig,
    layout: Layout,
    pp_rank: int,
    *,
    param_bytes: int = 2,
    distributed_optimizer: bool = True,
    overlap_grad_reduce: bool = False,
    dp_rank: int | None = None,
    expert_dp_rank: int | None = None,
    grad_bytes: int = 4,
) -> StaticMemory:
    """Parameter, gradient and optimizer bytes of pipeline rank `pp_rank` (all its chunks).

    `dp_rank` / `expert_dp_rank` (the rank in the DP x CP and expert-DP groups) make the
    optimizer count exact for that rank; None gives each rank a full shard (upper bound).
    `grad_bytes`: `GRAD_BYTES[optimizer.grad_reduce_dtype]` (4, or 2 with bf16 gradients).
    """
    total = StaticMemory()
    dense_dp = layout.dp * layout.cp
    for vp, chunk in enumerate(stage_inventory(model, layout, pp_rank)):
        bucketing = overlap_grad_reduce and vp == 0 and pp_rank == 0
        bucket = max(40_000_000, 1_000_000 * layout.dp) if bucketing else None
        dense, experts = _split(chunk)
        total += _buffer_memory(
            dense, dense_dp, param_bytes, distributed_optimizer, bucket, dp_rank, False, grad_bytes
        )
        total += _buffer_memory(
            experts,
            layout.expert_dp,
            param_bytes,
            distributed_optimizer,
            bucket,
            expert_dp_rank,
            expert=True,
            grad_bytes=grad_bytes,
        )
        if model.fp8 is not None:
            n = _fp8_numel(chunk)
            if model.fp8_param:  # the parameter is the 1-byte FP8 data, only the transpose cached
                total.params_bytes -= (param_bytes - 1) * n
                total.fp8_weight_bytes += FP8_PARAM_CACHE_BYTES * n
            else:
                total.fp8_weight_bytes += FP8_WEIGHT_BYTES * n
    return total
