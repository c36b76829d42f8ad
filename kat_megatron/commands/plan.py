"""`kat plan CONFIG|PRESET --gpus N --gpu-mem-gb 80 [--gpus-per-node 8] [--seq-len S] [--top K]`.

Enumerates TP x PP x VPP x EP x ETP x CP x DP layouts for the model, estimates per-GPU memory and
relative step cost, and prints the best K that fit as a table and as `kat train` overrides
(`kat_megatron/planning/`, formulas in docs/scaling.md). `--layout parallel.tp=2 ...` explains one
layout instead. With a run config, sequence length and batch default to the config's. Exit status
1 when no layout fits.
"""

from __future__ import annotations

import argparse
import os


def _defaults(name: str) -> tuple[object, str, dict, tuple[str, ...]]:
    """(ModelConfig, display name, batch defaults, overrides that select the model)."""
    from kat_megatron.models.info import resolve_model

    model, shown = resolve_model(name)
    if name.endswith((".yaml", ".yml")) or os.path.isfile(name):
        from kat_megatron.config import load_config

        cfg = load_config(name)
        t = cfg.training
        batch = dict(
            seq_len=cfg.data.seq_length,
            global_batch=t.global_batch_size,
            micro_batch=t.micro_batch_size,
            distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            grad_reduce_dtype=cfg.optimizer.grad_reduce_dtype,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_p2p_comm=cfg.parallel.overlap_p2p_comm is not False,
        )
        return model, shown, batch, ()
    return model, shown, {}, (f"model.preset={name}",)


def _batch_from_overrides(items: list[str]) -> dict:
    """Batch keys in a pasted `kat plan` override line (`training.micro_batch_size=1` ...)."""
    names = {
        "training.micro_batch_size": "micro_batch",
        "training.global_batch_size": "global_batch",
        "data.seq_length": "seq_len",
    }
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key in names:
            out[names[key]] = int(value)
    return out


def run(args: argparse.Namespace) -> int:
    from kat_megatron.planning.cost import Hardware
    from kat_megatron.planning.layout import check_layout, layout_from_overrides
    from kat_megatron.planning.planner import PlanOptions, evaluate, plan
    from kat_megatron.planning.report import detail, report

    model, shown, batch, extra = _defaults(args.name)
    items = " ".join(args.layout or []).split()
    batch.update(_batch_from_overrides(items))
    given = {
        "seq_len": args.seq_len,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "distributed_optimizer": False if args.no_distributed_optimizer else None,
        "overlap_grad_reduce": True if args.overlap_grad_reduce else None,
        "overlap_p2p_comm": False if args.no_overlap_p2p_comm else None,
        "grad_reduce_dtype": args.grad_reduce_dtype,
    }
    batch.update({k: v for k, v in given.items() if v is not None})
    opts = PlanOptions(
        gpus=args.gpus,
        gpu_mem_gb=args.gpu_mem_gb,
        gpus_per_node=args.gpus_per_node,
        recompute=args.recompute,
        reserve_gb=args.reserve_gb,
        fragmentation=args.fragmentation,
        moe_load_factor=args.moe_load_factor,
        max_vpp=args.max_vpp,
        hardware=Hardware(mfu=args.mfu),
        **batch,
    )
    if args.layout:
        layout = layout_from_overrides(items, args.gpus)
        reason = check_layout(model, layout, opts.cluster, opts.batch)
        if reason:
            raise ValueError(f"{layout.label()} is invalid: {reason}")
        print(detail(evaluate(model, layout, opts)))
        return 0
    result = plan(model, opts, shown)
    config = args.name if not extra else "CONFIG.yaml"
    print(report(result, top=args.top, config=config, extra_overrides=extra))
    return 0 if result.fitting else 1


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="find parallel layouts that fit a cluster (memory and cost estimates)",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " "),
    )
    p.add_argument("name", help="preset (kat-v1-40b, kat-200b-a40b, ...) or a run config.yaml")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU, GiB")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 8192 or config's)")
    p.add_argument(
        "--global-batch", type=int, help="sequences per step (default: 4M tokens, or the config's)"
    )
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default 1)")
    p.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    p.add_argument(
        "--recompute",
        default="auto",
        choices=("auto", "none", "selective", "full"),
        help="activation recompute; auto picks the cheapest that fits",
    )
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="step time with the gradient reduce-scatter overlapped with the last micro-batch's "
        "backward (parallel.overlap_grad_reduce=true)",
    )
    p.add_argument(
        "--no-overlap-p2p-comm",
        action="store_true",
        help="step time with every pipeline send / receive exposed, also with VPP "
        "(parallel.overlap_p2p_comm=false; default: behind compute with VPP)",
    )
    p.add_argument(
        "--grad-reduce-dtype",
        choices=("fp32", "bf16"),
        help="gradient buffer dtype (optimizer.grad_reduce_dtype; default fp32 or the config's)",
    )
    p.add_argument("--moe-load-factor", type=float, default=1.2, help="busiest/mean expert load")
    p.add_argument("--reserve-gb", type=float, default=4.0, help="CUDA context, NCCL, workspaces")
    p.add_argument("--fragmentation", type=float, default=0.10, help="of activation memory")
    p.add_argument(
        "--mfu", type=float, default=0.8, help="large-GEMM efficiency (fraction of peak)"
    )
    p.add_argument("--max-vpp", type=int, default=8, help="largest virtual pipeline size tried")
    p.add_argument(
        "--layout",
        nargs="+",
        metavar="parallel.KEY=N",
        help="explain one layout instead of searching: parallel.tp=8 parallel.pp=2 ..., or a "
        "whole override line of the plan's output",
    )
    p.set_defaults(func=run)
