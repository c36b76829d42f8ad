"""Parallel layouts for `kat plan CONFIG|PRESET --gpus N`: what a layout is and which ones are valid.

A `Layout` is TP x PP x VPP x EP x ETP x CP x DP with world size tp * pp * cp * dp, optionally with
uneven pipeline stages (`first_stage_layers`, `last_stage_layers`, or the embedding and/or loss
counted as layers: `account_for_*_in_pipeline_split`). `check_layout`
returns the reason a layout cannot run (or None); `enumerate_layouts` walks every candidate for a
cluster and returns the valid ones and the rejected ones with their reasons.

Rules, each Megatron-Core's (or this project's config schema, `kat_megatron.config.check_layout`):
TP divides attention heads, KV groups and the FFN width, and stays inside a node (its all-gathers
and reduce-scatters sit on the critical path of every layer); PP x VPP divides the layers, or the
first/last stage take given counts and the middle stages share the rest evenly (multiples of VPP),
or PP x VPP divides the layers plus the embedding and/or loss counted as layers
(`config.schema.pipeline_split`); EP divides the experts; the world size divides ETP x EP x PP
(Megatron-Core 0.16.1's `initialize_model_parallel`: EP need not divide DP x CP, experts may
spread over tensor-parallel ranks); ETP divides the expert FFN width; the vocabulary is padded to a multiple of 128 x TP, so it
always divides; CP splits each sequence into 2 x CP chunks (load-balanced causal attention); the
global batch is a multiple of micro-batch x DP; the interleaved schedule needs the number of
micro-batches to be a multiple of PP (Megatron-Core's `microbatch_group_size_per_vp_stage`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from kat_megatron.config.schema import ModelConfig, ParallelConfig, expert_tp_size
from kat_megatron.config.schema import check_layout as schema_check
from kat_megatron.config.schema import pipeline_split as schema_split

ACCOUNT_KEYS = ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split")


@dataclass(frozen=True)
class Layout:
    """One parallel layout; world size = tp * pp * cp * dp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int | None = None
    """Virtual stages per pipeline rank (interleaved 1F1B); None = plain 1F1B."""
    ep: int = 1
    etp: int | None = None
    """Expert tensor-parallel size; None = same as tp."""
    cp: int = 1
    first_stage_layers: int | None = None
    """Decoder layers on the first pipeline stage; None = an even share (as ParallelConfig)."""
    last_stage_layers: int | None = None
    """Decoder layers on the last pipeline stage; None = an even share."""
    account_for_embedding_in_pipeline_split: bool = False
    """The embedding counts as a layer in the split (ParallelConfig's option of that name)."""
    account_for_loss_in_pipeline_split: bool = False
    """The output layer and loss count as a layer in the split."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def etp_size(self) -> int:
        return expert_tp_size(self.tp, self.etp)

    @property
    def sp(self) -> bool:
        """Sequence parallelism: on whenever tp > 1 (the config default, and MoE needs it)."""
        return self.tp > 1

    @property
    def expert_dp(self) -> int:
        """Expert data-parallel size: world / (etp * ep * pp)."""
        return self.world // (self.etp_size * self.ep * self.pp)

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    @property
    def uneven(self) -> bool:
        """First or last pipeline stage with a given layer count."""
        return self.first_stage_layers is not None or self.last_stage_layers is not None

    @property
    def accounted(self) -> bool:
        """The embedding or the loss counts as a layer in the pipeline split."""
        return (
            self.account_for_embedding_in_pipeline_split or self.account_for_loss_in_pipeline_split
        )

    def label(self) -> str:
        """'TP2 PP8 VPP2 EP64 ETP1 CP1 DP64'; 'PP8(15,15)' for uneven stages, 'PP8(emb,loss)'
        where the embedding and the loss count as layers ('=': an even share)."""
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.uneven:
            parts[-1] += f"({self.first_stage_layers or '='},{self.last_stage_layers or '='})"
        if self.accounted:
            emb = "emb" if self.account_for_embedding_in_pipeline_split else "="
            parts[-1] += f"({emb},{'loss' if self.account_for_loss_in_pipeline_split else '='})"
        if self.vpp:
            parts.append(f"VPP{self.vpp}")
        parts += [f"EP{self.ep}"]
        if self.etp is not None and self.etp != self.tp:
            parts.append(f"ETP{self.etp}")
        parts += [f"CP{self.cp}", f"DP{self.dp}"]
        return " ".join(parts)

    def overrides(self, distributed_optimizer: bool = True) -> list[str]:
        """Config overrides `kat train` accepts for this layout (`parallel.tp=8 ...`)."""
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}"]
        if self.vpp:
            out.append(f"parallel.vpp={self.vpp}")
        out += [f"parallel.ep={self.ep}", f"parallel.cp={self.cp}"]
        if self.etp is not None and self.etp != self.tp:
            out.append(f"parallel.etp={self.etp}")
        for name in ("first_stage_layers", "last_stage_layers"):
            if getattr(self, name) is not None:
                out.append(f"parallel.{name}={getattr(self, name)}")
        for name in ACCOUNT_KEYS:
            if getattr(self, name):
                out.append(f"parallel.{name}=true")
        if not distributed_optimizer:
            out.append("parallel.use_distributed_optimizer=false")
        return out

    def parallel_config(self, distributed_optimizer: bool = True) -> ParallelConfig:
        return ParallelConfig(
            tp=self.tp,
            pp=self.pp,
            vpp=self.vpp,
            ep=self.ep,
            etp=self.etp,
            cp=self.cp,
            first_stage_layers=self.first_stage_layers,
            last_stage_layers=self.last_stage_layers,
            use_distributed_optimizer=distributed_optimizer,
            **{k: getattr(self, k) for k in ACCOUNT_KEYS},
        )

    @classmethod
    def from_parallel(cls, par: ParallelConfig, world: int) -> Layout:
        """The layout a run with `par` on `world` ranks uses."""
        dp = world // (par.tp * par.pp * par.cp)
        return cls(
            tp=par.tp,
            pp=par.pp,
            dp=dp,
            vpp=par.vpp,
            ep=par.ep,
            etp=par.etp,
            cp=par.cp,
            first_stage_layers=par.first_stage_layers,
            last_stage_layers=par.last_stage_layers,
            **{k: getattr(par, k) for k in ACCOUNT_KEYS},
        )


@dataclass(frozen=True)
class Cluster:
    """GPUs available to one job."""

    gpus: int
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ValueError("--gpus and --gpus-per-node must be >= 1")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ValueError(
                f"--gpus {self.gpus} is not a whole number of nodes of {self.gpus_per_node}"
            )


@dataclass(frozen=True)
class Batch:
    """Sequence length and batch shape of one optimizer step."""

    seq_len: int
    global_batch: int
    micro_batch: int = 1

    def microbatches(self, layout: Layout) -> int:
        """Micro-batches per step on each data-parallel rank."""
        return self.global_batch // (self.micro_batch * layout.dp)


def check_layout(model: ModelConfig, layout: Layout, cluster: Cluster, batch: Batch) -> str | None:
    """Why `layout` cannot run `model` on `cluster` with `batch` (one line), or None if it can."""
    if layout.world != cluster.gpus:
        return f"tp*pp*cp*dp = {layout.world} != {cluster.gpus} GPUs"
    if layout.tp > cluster.gpus_per_node or cluster.gpus_per_node % layout.tp:
        return f"TP{layout.tp} does not fit inside a node of {cluster.gpus_per_node} GPUs"
    if layout.etp_size > cluster.gpus_per_node or cluster.gpus_per_node % layout.etp_size:
        return f"ETP{layout.etp_size} does not fit inside a node of {cluster.gpus_per_node} GPUs"
    try:
        schema_check(model, layout.parallel_config(), world_size=layout.world)
    except ValueError as e:
        return str(e)
    return _check_moe(model, layout) or _check_batch(layout, batch)


def _check_moe(model: ModelConfig, layout: Layout) -> str | None:
    if layout.etp is None or layout.etp == layout.tp:
        return None
    if not model.is_moe:
        return f"ETP{layout.etp} needs an MoE model"
    if layout.ep == 1:
        # Megatron-Core reduces expert gradients over the dense DP group when EP = 1.
        return f"ETP{layout.etp} != TP{layout.tp} needs EP > 1"
    ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
    if ffn % layout.etp:
        return f"ETP{layout.etp} does not divide the expert FFN width {ffn}"
    return None


def _check_batch(layout: Layout, batch: Batch) -> str | None:
    if batch.seq_len % (2 * layout.cp) and layout.cp > 1:
        return f"CP{layout.cp} needs the sequence length divisible by 2*cp = {2 * layout.cp}"
    if batch.global_batch % (batch.micro_batch * layout.dp):
        return (
            f"global batch {batch.global_batch} is not a multiple of micro-batch x DP = "
            f"{batch.micro_batch} x {layout.dp}"
        )
    m = batch.microbatches(layout)
    if layout.vpp and m % layout.pp:
        return f"interleaved schedule needs micro-batches per step ({m}) divisible by PP{layout.pp}"
    return None


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


@functools.cache
def uneven_split(num_layers: int, pp: int, vpp: int | None) -> tuple[int | None, int | None]:
    """(first_stage_layers, last_stage_layers) for a PP x VPP that does not divide the layers: of
    the splits Megatron-Core accepts, the one whose busiest stage is lightest, then with first and
    last stage closest (126 layers on PP8: 15 + 6 x 16 + 15, Megatron-LM's split with the
    embedding and the loss counted as layers), then the lighter last stage; (None, None) when
    there is none."""
    v = vpp or 1
    best, key = (None, None), None
    per_max = -(-num_layers // pp)
    for first in [None, *range(v, per_max + v, v)]:
        for last in [None, *range(v, per_max + v, v)]:
            if first is None and last is None:
                continue
            par = ParallelConfig(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
            try:
                split = schema_split(num_layers, par)
            except ValueError:
                continue
            k = (max(split), abs(split[0] - split[-1]), split[-1])
            if key is None or k < key:
                best, key = (first, last), k
    return best


@functools.cache
def split_fields(
    num_layers: int, pp: int, vpp: int | None
) -> tuple[tuple[str, object], ...] | None:
    """`Layout` fields that split `num_layers` over PP x VPP: () when PP x VPP divides them;
    otherwise, of `uneven_split`'s first/last split and Megatron-Core's splits with the embedding
    and/or the loss counted as layers (`account_for_*_in_pipeline_split`: 126 + 2 layers on
    PP8 x VPP8), the one whose busiest stage is lightest, then with first and last stage closest,
    then the lighter last stage (ties: the first/last split); None when there is none."""
    if num_layers % (pp * (vpp or 1)) == 0:
        return ()
    options = []
    first, last = uneven_split(num_layers, pp, vpp)
    if (first, last) != (None, None):
        options.append((("first_stage_layers", first), ("last_stage_layers", last)))
    for flags in ((True, True), (True, False), (False, True)):
        options.append(tuple(zip(ACCOUNT_KEYS, flags)))
    best, key = None, None
    for fields in options:
        try:
            split = schema_split(num_layers, ParallelConfig(pp=pp, vpp=vpp, **dict(fields)))
        except ValueError:
            continue
        k = (max(split), abs(split[0] - split[-1]), split[-1])
        if key is None or k < key:
            best, key = fields, k
    return best


def _pipelines(num_layers: int, pp: int, max_vpp: int) -> list[tuple[int | None, tuple]]:
    """(vpp, split fields) pipeline shapes tried for `pp`: where PP divides the layers, plain
    1F1B and every VPP dividing each stage's layers, all even; where it does not, the split of
    `split_fields` at each VPP that has one (plain 1F1B kept, to be rejected, if none)."""
    if pp == 1:
        return [(None, ())]
    if num_layers % pp == 0:
        vpps = [v for v in _divisors(num_layers // pp, max_vpp) if v > 1]
        return [(v, ()) for v in (None, *vpps)]
    out = [(v, split_fields(num_layers, pp, v)) for v in (None, *range(2, max_vpp + 1))]
    out = [(v, fields) for v, fields in out if fields is not None]
    return out or [(None, ())]


def candidate_layouts(
    model: ModelConfig, cluster: Cluster, max_vpp: int = 8, max_cp: int = 16
) -> list[Layout]:
    """Every TP x PP x VPP x CP x EP x ETP whose product fits the GPU count (unchecked).

    ETP is tried at TP and 1 (the two settings Megatron-LM MoE recipes use), EP wherever ETP x EP
    x PP divides the GPUs; VPP up to `max_vpp` virtual stages, CP up to `max_cp`. A PP (x VPP)
    that does not divide the layers gets the split of `split_fields`.
    """
    n = cluster.gpus
    experts = model.num_moe_experts or 1
    out = []
    for tp in _divisors(n, cluster.gpus_per_node):
        for pp in _divisors(n // tp, model.num_layers):
            for cp in _divisors(n // (tp * pp), max_cp):
                dp = n // (tp * pp * cp)
                for vpp, fields in _pipelines(model.num_layers, pp, max_vpp):
                    for ep in _divisors(experts, n // pp):
                        etps = sorted({tp, 1}) if model.is_moe and ep > 1 else [tp]
                        for etp in etps:
                            if n % (etp * ep * pp):
                                continue
                            layout = Layout(
                                tp=tp,
                                pp=pp,
                                dp=dp,
                                vpp=vpp,
                                ep=ep,
                                etp=None if etp == tp else etp,
                                cp=cp,
                                **dict(fields),
                            )
                            out.append(layout)
    return out


@dataclass(frozen=True)
class Rejection:
    layout: Layout
    reason: str


def enumerate_layouts(
    model: ModelConfig, cluster: Cluster, batch: Batch, max_vpp: int = 8
) -> tuple[list[Layout], list[Rejection]]:
    """(valid layouts, rejected layouts with reasons) for `model` on `cluster`."""
    valid, rejected = [], []
    for layout in candidate_layouts(model, cluster, max_vpp):
        reason = check_layout(model, layout, cluster, batch)
        if reason is None:
            valid.append(layout)
        else:
            rejected.append(Rejection(layout, reason))
    return valid, rejected


def layout_from_overrides(items: list[str], gpus: int) -> Layout:
    """A layout from `parallel.KEY=VALUE` items, DP filling the GPUs.

    Takes a whole override line of `kat plan`'s output: other keys are skipped.
    """
    sizes = [f.name for f in dataclasses.fields(Layout) if f.name != "dp"]
    other = {f.name for f in dataclasses.fields(ParallelConfig)} - set(sizes)
    keys = {f.name: f.default for f in dataclasses.fields(ParallelConfig) if f.name in sizes}
    for item in items:
        key, _, value = item.partition("=")
        name = key.removeprefix("parallel.")
        if not key.startswith("parallel.") or name in other:
            continue
        if name not in keys or not value:
            raise ValueError(f"--layout {item!r}: expected parallel.{{{','.join(keys)}}}=N")
        if name in ACCOUNT_KEYS:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"--layout {item!r}: expected true or false")
            keys[name] = value.lower() == "true"
            continue
        keys[name] = None if value.lower() in ("none", "null") else int(value)
    mp = keys["tp"] * keys["pp"] * keys["cp"]
    if gpus % mp:
        raise ValueError(f"--layout: tp*pp*cp = {mp} does not divide --gpus {gpus}")
    return Layout(dp=gpus // mp, **keys)
