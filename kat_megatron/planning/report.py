"""Text output of `kat plan CONFIG|PRESET --gpus N ...`: the ranked table and the layouts as overrides.

Memory columns are GiB per GPU on the pipeline stage that needs the most (`stage`: first or last);
`optim` is with the distributed optimizer, `noDO` the same without it. `comm` is TP / CP / EP / DP bytes
one GPU sends per step, in GB. `step` is a relative estimate (see `cost.py`), for ranking only.
"""

from __future__ import annotations

from collections import Counter

from kat_megatron.planning.planner import GIB, LayoutPlan, PlanResult

COLUMNS = (
    ("#", 3),
    ("layout", 30),
    ("m", 4),
    ("recompute", 9),
    ("params", 6),
    ("grads", 6),
    ("optim", 6),
    ("noDO", 6),
    ("activ", 6),
    ("logits", 6),
    ("rsrv", 5),
    ("total", 6),
    ("stage", 5),
    ("fits", 4),
    ("bubble", 6),
    ("TFLOP", 7),
    ("comm TP/CP/EP/DP GB", 20),
    ("step s", 7),
)


def fmt_bytes(n: float) -> str:
    """12_345_678 -> '11.8 MiB'; GiB from 1 GiB up."""
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _row(i: int, p: LayoutPlan) -> list[str]:
    mem, cost = p.memory, p.cost
    act = mem.activations
    stage = "first" if mem.pp_rank == 0 else "last"
    if p.layout.pp == 1:
        stage = "all"
    logits = (act.logits + act.mtp) * (1 + mem.fragmentation)
    activ = mem.activation_bytes - logits
    comm = "/".join(
        f"{x / 1e9:.0f}" for x in (cost.tp_bytes, cost.cp_bytes, cost.ep_bytes, cost.dp_bytes)
    )
    return [
        str(i),
        p.layout.label(),
        str(p.microbatches),
        p.recompute,
        *(
            f"{x / GIB:.1f}"
            for x in (
                mem.static.params_bytes,
                mem.static.grad_bytes,
                mem.static.optimizer_bytes,
                mem.optimizer_without_do,
                activ,
                logits,
                mem.reserve,
                mem.total,
            )
        ),
        stage,
        "yes" if p.fits else "NO",
        f"{cost.bubble:.3f}",
        f"{cost.flops / 1e12:.0f}",
        comm,
        f"{cost.step_s:.2f}",
    ]


def table(plans: list[LayoutPlan], start: int = 1) -> str:
    """Fixed-width table of `plans`."""
    head = " ".join(f"{name:>{w}}" if i else f"{name:<{w}}" for i, (name, w) in enumerate(COLUMNS))
    lines = [head, "-" * len(head)]
    for i, p in enumerate(plans, start):
        cells = _row(i, p)
        lines.append(
            " ".join(
                f"{c:<{w}}" if j in (0, 1, 3) else f"{c:>{w}}"
                for j, (c, (_, w)) in enumerate(zip(cells, COLUMNS))
            )
        )
    return "\n".join(lines)


def _header(result: PlanResult) -> list[str]:
    o = result.options
    return [
        f"kat plan: {result.model_name} on {o.gpus} GPUs x {o.gpu_mem_gb:g} GiB "
        f"({o.gpus_per_node} per node), seq {o.seq_len}, global batch {o.batch.global_batch}, "
        f"micro-batch {o.micro_batch}",
        f"assumptions: bf16 params/activations, {o.grad_reduce_dtype} grads, fp32 Adam state, "
        f"{'distributed' if o.distributed_optimizer else 'replicated'} optimizer, "
        f"{o.backend} attention, reserve {o.reserve_gb:g} GiB, fragmentation "
        f"{o.fragmentation:.0%} of activations, dropless MoE with load factor "
        f"{o.moe_load_factor:g}; step time: matmul efficiency by GEMM shape (peak "
        f"{o.hardware.mfu:g}), TP forward exposed / backward overlapped, EP exposed, DP "
        f"reduce-scatter {'behind the last backward' if o.overlap_grad_reduce else 'exposed'}, "
        "all-gather exposed, PP p2p "
        f"{'behind compute with VPP' if o.overlap_p2p_comm else 'exposed'}",
        f"layouts: {len(result.plans) + len(result.rejected)} candidates, "
        f"{len(result.rejected)} invalid, {len(result.plans)} valid, "
        f"{len(result.fitting)} fit",
    ]


def rejection_summary(result: PlanResult, limit: int = 6) -> list[str]:
    """The most common rejection reasons (numbers replaced by N so that similar ones group)."""
    import re

    counts = Counter(re.sub(r"\d+", "N", r.reason.split(";")[0]) for r in result.rejected)
    return [f"  {n:>6} x {reason}" for reason, n in counts.most_common(limit)]


def report(
    result: PlanResult,
    top: int = 10,
    config: str = "CONFIG.yaml",
    extra_overrides: tuple[str, ...] = (),
) -> str:
    """The whole `kat plan` output; `extra_overrides` lead each override line (a preset)."""
    lines = _header(result)
    if result.rejected:
        lines.append("most common reasons a layout is invalid:")
        lines += rejection_summary(result)
    best = result.fitting[:top]
    if not best:
        lines.append("no layout fits; the leanest ones:")
        best = sorted(result.plans, key=lambda p: p.memory.total)[:top]
    lines += ["", table(best), ""]
    o = result.options
    nodes = max(o.gpus // o.gpus_per_node, 1)
    lines.append(
        f"as config overrides, for `kat train {config} OVERRIDES` or `kat submit {config} "
        f"OVERRIDES --nodes {nodes} --gpus-per-node {min(o.gpus, o.gpus_per_node)} --dry-run`:"
    )
    for i, p in enumerate(best, 1):
        args = " ".join([*extra_overrides, *p.overrides(o.batch, o.distributed_optimizer)])
        lines.append(f"  {i:>2}: {args}")
    return "\n".join(lines)


def detail(p: LayoutPlan) -> str:
    """Every term of one plan: static parts, activation terms, cost components."""
    mem, act, cost = p.memory, p.memory.activations, p.cost
    st = mem.static
    lines = [
        f"{p.layout.label()}: recompute {p.recompute}, {p.microbatches} micro-batches per step, "
        f"worst stage pp_rank {mem.pp_rank}, {'fits' if p.fits else 'does NOT fit'} ("
        + ", ".join(f"pp_rank {r}: {fmt_bytes(t)}" for r, t in p.stage_totals.items())
        + ")",
        f"  params {fmt_bytes(st.params_bytes)} ({st.numel:,} on this GPU), grads "
        f"({'bf16' if st.grad_bytes < 4 * st.numel else 'fp32'}) "
        f"{fmt_bytes(st.grad_bytes)}, optimizer {fmt_bytes(st.optimizer_bytes)} (fp32 main "
        f"{fmt_bytes(st.main_param_bytes)} + Adam moments {fmt_bytes(st.moment_bytes)}; "
        f"without the distributed optimizer {fmt_bytes(mem.optimizer_without_do)})",
        f"  activations {fmt_bytes(act.total)}: decoder layers {fmt_bytes(act.layers)}, logits "
        f"{fmt_bytes(act.logits)}, MTP {fmt_bytes(act.mtp)}, workspace/transient "
        f"{fmt_bytes(act.workspace)}; +{mem.fragmentation:.0%} fragmentation, reserve "
        f"{fmt_bytes(mem.reserve)}; total {fmt_bytes(mem.total)} (tensors alone, as "
        f"max_memory_allocated counts them: {fmt_bytes(mem.allocated)})",
        "  one layer, one micro-batch: "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in act.terms.items()),
        f"  cost: {cost.flops / 1e12:,.0f} TFLOP per GPU, bubble {cost.bubble:.3f}, bytes sent "
        f"per GPU: TP {cost.tp_bytes / 1e9:.1f} GB, CP {cost.cp_bytes / 1e9:.1f} GB, EP "
        f"{cost.ep_bytes / 1e9:.1f} GB, DP {cost.dp_bytes / 1e9:.1f} GB, PP "
        f"{cost.pp_bytes / 1e9:.1f} GB; estimated {cost.step_s:.2f} s per step",
    ]
    return "\n".join(lines)
