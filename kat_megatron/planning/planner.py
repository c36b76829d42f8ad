"""Plan a cluster layout: `kat plan CONFIG|PRESET --gpus N --gpu-mem-gb 80 [--seq-len S] ...`.

For every valid layout (`layout.enumerate_layouts`) and recompute setting, estimate per-GPU memory
on the first and the last pipeline stage (the two that can be largest: the first holds the most
in-flight micro-batches and the embedding, the last the output layer, logits and MTP heads; with
a lighter uneven first stage also the second) as

    static (params + grads, fp32 or bf16 per `grad_reduce_dtype`, + optimizer state, `static.py`)
    + activations x (1 + fragmentation) (`activations.py`)
    + a fixed reserve (CUDA context, NCCL communicators, cuBLAS/TE workspaces),

keep the cheapest recompute setting that fits, and rank fitting layouts by estimated step time
(`cost.py`). Everything is analytic: no torch model is built, so a 200B plan takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kat_megatron.config.schema import ModelConfig
from kat_megatron.planning.activations import (
    RECOMPUTE,
    ActivationMemory,
    ActivationOptions,
    activation_memory,
)
from kat_megatron.planning.cost import Hardware, StepCost, step_cost, step_flops
from kat_megatron.planning.layout import Batch, Cluster, Layout, Rejection, enumerate_layouts
from kat_megatron.planning.static import GRAD_BYTES, StaticMemory, static_memory

GIB = 1024**3
TOKENS_PER_STEP = 4 * 1024**2


@dataclass(frozen=True)
class PlanOptions:
    """What `kat plan` searches over and assumes."""

    gpus: int
    gpu_mem_gb: float = 80.0
    """Usable memory per GPU, GiB."""
    gpus_per_node: int = 8
    seq_len: int = 8192
    global_batch: int | None = None
    """Sequences per optimizer step; None = 4M tokens per step (512 at 8K, 128 at 32K)."""
    micro_batch: int = 1
    recompute: str = "auto"
    """`auto` (cheapest that fits), `none`, `selective` or `full`."""
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    """`parallel.overlap_grad_reduce`: with the distributed optimizer, the gradient
    reduce-scatter hidden behind the last micro-batch's backward in the step-time model (the
    parameter all-gather stays exposed)."""
    overlap_p2p_comm: bool = True
    """`parallel.overlap_p2p_comm` at its default (on wherever a layout has VPP); false models
    `parallel.overlap_p2p_comm=false`: every pipeline send / receive on the critical path."""
    reserve_gb: float = 4.0
    """CUDA context (~0.5 GiB), NCCL communicator buffers, cuBLAS/TE workspaces."""
    fragmentation: float = 0.10
    """Caching-allocator overhead as a fraction of activation memory."""
    moe_load_factor: float = 1.2
    """Dropless MoE: busiest expert rank's tokens / mean (1 = perfectly balanced router)."""
    act_bytes: int = 2
    param_bytes: int = 2
    grad_reduce_dtype: str = "fp32"
    """`optimizer.grad_reduce_dtype`: fp32 (4-byte gradient buffers) or bf16 (2 bytes)."""
    backend: str = "te"
    max_vpp: int = 8
    hardware: Hardware = field(default_factory=Hardware)

    def __post_init__(self) -> None:
        if self.recompute not in ("auto", *RECOMPUTE):
            raise ValueError(
                f"--recompute {self.recompute}: expected auto, none, selective or full"
            )
        if self.grad_reduce_dtype not in GRAD_BYTES:
            raise ValueError(
                f"--grad-reduce-dtype {self.grad_reduce_dtype}: expected one of {list(GRAD_BYTES)}"
            )
        if self.grad_reduce_dtype == "bf16" and self.param_bytes != 2:
            raise ValueError("--grad-reduce-dtype bf16 needs bf16 parameters")

    @property
    def grad_bytes(self) -> int:
        return GRAD_BYTES[self.grad_reduce_dtype]

    @property
    def batch(self) -> Batch:
        gbs = self.global_batch or max(TOKENS_PER_STEP // self.seq_len, 1)
        return Batch(self.seq_len, gbs, self.micro_batch)

    @property
    def cluster(self) -> Cluster:
        return Cluster(self.gpus, self.gpus_per_node)

    def activation_options(self, recompute: str) -> ActivationOptions:
        return ActivationOptions(
            seq_len=self.seq_len,
            micro_batch=self.micro_batch,
            act_bytes=self.act_bytes,
            recompute=recompute,
            backend=self.backend,
            moe_load_factor=self.moe_load_factor,
        )


@dataclass
class StageMemory:
    """Per-GPU memory of one pipeline stage, bytes."""

    pp_rank: int
    static: StaticMemory
    activations: ActivationMemory
    fragmentation: float
    reserve: float
    optimizer_without_do: int = 0
    """Optimizer bytes if the distributed optimizer were off (fp32 main copy + moments)."""

    @property
    def activation_bytes(self) -> float:
        return self.activations.total * (1 + self.fragmentation)

    @property
    def total(self) -> float:
        return self.static.total_bytes + self.activation_bytes + self.reserve

    @property
    def allocated(self) -> float:
        """The tensors alone: what `torch.cuda.max_memory_allocated` reports at the peak, without
        the caching allocator's slack (`fragmentation`) or what lives outside it (`reserve`: the
        CUDA context, NCCL buffers). A published "peak allocated" figure compares with this;
        whether a layout fits is decided on `total`."""
        return self.static.total_bytes + self.activations.total


@dataclass
class LayoutPlan:
    """One layout with its chosen recompute setting, worst-stage memory and step cost."""

    layout: Layout
    recompute: str
    memory: StageMemory
    cost: StepCost
    fits: bool
    microbatches: int
    stage_totals: dict[int, float] = field(default_factory=dict)
    """Total bytes of each pipeline rank evaluated (the first and the last)."""

    def overrides(self, batch: Batch, distributed_optimizer: bool = True) -> list[str]:
        """`kat train` overrides for this plan."""
        out = [
            *self.layout.overrides(distributed_optimizer),
            f"training.micro_batch_size={batch.micro_batch}",
            f"training.global_batch_size={batch.global_batch}",
            f"data.seq_length={batch.seq_len}",
        ]
        if self.recompute != "none":
            out.append(f"training.recompute={self.recompute}")
        return out


@dataclass
class PlanResult:
    model_name: str
    options: PlanOptions
    plans: list[LayoutPlan]
    """Every valid layout, fitting ones first, each group by estimated step time."""
    rejected: list[Rejection]

    @property
    def fitting(self) -> list[LayoutPlan]:
        return [p for p in self.plans if p.fits]


def stage_memory(
    model: ModelConfig,
    layout: Layout,
    pp_rank: int,
    opts: PlanOptions,
    recompute: str,
    static: StaticMemory | None = None,
) -> StageMemory:
    """Memory of pipeline rank `pp_rank` under `layout` with `recompute`."""
    if static is None:
        static = static_memory(
            model,
            layout,
            pp_rank,
            param_bytes=opts.param_bytes,
            distributed_optimizer=opts.distributed_optimizer,
            grad_bytes=opts.grad_bytes,
        )
    m = opts.batch.microbatches(layout)
    act = activation_memory(model, layout, pp_rank, m, opts.activation_options(recompute))
    # Without the distributed optimizer every rank keeps an fp32 main copy (16-bit params) and
    # both Adam moments for all its parameters (Float16OptimizerWithFloat16Params).
    per_param = (4 if opts.param_bytes < 4 else 0) + 8
    return StageMemory(
        pp_rank=pp_rank,
        static=static,
        activations=act,
        fragmentation=opts.fragmentation,
        reserve=opts.reserve_gb * GIB,
        optimizer_without_do=static.numel * per_param,
    )


def evaluate(
    model: ModelConfig, layout: Layout, opts: PlanOptions, flops: dict[str, float] | None = None
) -> LayoutPlan:
    """The cheapest recompute setting that fits (or the leanest one, marked not fitting)."""
    levels = RECOMPUTE if opts.recompute == "auto" else (opts.recompute,)
    # The first stage holds the most in-flight micro-batches, the last the logits; with a lighter
    # first stage the second (the most micro-batches of a full share) can be the largest.
    lighter_first = layout.first_stage_layers or layout.account_for_embedding_in_pipeline_split
    stages = sorted({0, layout.pp - 1} | ({1} if lighter_first and layout.pp > 1 else set()))
    statics = {
        r: static_memory(
            model,
            layout,
            r,
            param_bytes=opts.param_bytes,
            distributed_optimizer=opts.distributed_optimizer,
            grad_bytes=opts.grad_bytes,
        )
        for r in stages
    }
    capacity = opts.gpu_mem_gb * GIB
    for recompute in levels:
        per_stage = [stage_memory(model, layout, r, opts, recompute, statics[r]) for r in stages]
        worst = max(per_stage, key=lambda s: s.total)
        if worst.total <= capacity:
            break
    cost = step_cost(
        model,
        layout,
        opts.batch,
        opts.activation_options(recompute),
        (worst.static.dense_buffer_numel, worst.static.expert_buffer_numel),
        opts.gpus_per_node,
        opts.hardware,
        opts.distributed_optimizer,
        flops=None if flops is None else flops[recompute],
        grad_bytes=opts.grad_bytes,
        overlap_grad_reduce=opts.overlap_grad_reduce,
        overlap_p2p_comm=opts.overlap_p2p_comm,
    )
    return LayoutPlan(
        layout=layout,
        recompute=recompute,
        memory=worst,
        cost=cost,
        fits=worst.total <= capacity,
        microbatches=opts.batch.microbatches(layout),
        stage_totals={m.pp_rank: m.total for m in per_stage},
    )


def plan(model: ModelConfig, opts: PlanOptions, model_name: str = "") -> PlanResult:
    """Enumerate, estimate and rank every layout of `model` on the cluster in `opts`."""
    valid, rejected = enumerate_layouts(model, opts.cluster, opts.batch, opts.max_vpp)
    flops = {r: step_flops(model, opts.batch, r) for r in RECOMPUTE}
    plans = [evaluate(model, layout, opts, flops) for layout in valid]
    plans.sort(key=lambda p: (not p.fits, p.cost.step_s, p.memory.total))
    return PlanResult(model_name or (model.preset or ""), opts, plans, rejected)
