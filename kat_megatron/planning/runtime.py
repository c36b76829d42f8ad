"""The planner's estimate next to what a run allocates, logged by `kat train CONFIG.yaml ...`.

`log_memory_check(trainer)` runs once after the model, DDP and optimizer are built (and a
checkpoint resumed): on global rank 0 it logs the `kat plan` estimate for this run's layout and
the bytes actually held by the model's parameters, the DDP gradient buffers and the optimizer
(fp32 main copies and Adam moments; before the first step torch's Adam has not created its
moments yet, so they are sized from the optimizer's parameter groups, which exist). On CUDA it
also logs `torch.cuda.max_memory_allocated()` after the first optimizer step beside the estimated
peak (static + activations; the allocator statistic excludes the CUDA context and fragmentation,
so the planner's reserve and fragmentation allowance are left out of that comparison). Only rank
0 measures and logs, so no collective is needed.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from kat_megatron.models.builder import resolve_backend, resolve_dtype
from kat_megatron.planning.activations import ActivationOptions, activation_memory
from kat_megatron.planning.layout import Layout
from kat_megatron.planning.static import GRAD_BYTES, StaticMemory, static_memory

log = logging.getLogger("kat")


def _mib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _inner_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in chained if getattr(o, "optimizer", None) is not None]


def measure_static(model_chunks, optimizer) -> StaticMemory:
    """Bytes this rank holds for parameters (distinct storages), DDP grad buffers, optimizer."""
    storages = {}
    for chunk in model_chunks:
        for p in chunk.parameters():
            s = p.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    grads = sum(
        b.grad_data.nbytes
        for chunk in model_chunks
        for b in (*chunk.buffers, *chunk.expert_parallel_buffers)
    )
    main = moments = 0
    for opt in _inner_optimizers(optimizer):
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            main += sum(p.nbytes for g in getattr(opt, name, []) for p in g if p is not None)
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                state = opt.optimizer.state.get(p, {})
                if "exp_avg" in state:
                    moments += state["exp_avg"].nbytes + state["exp_avg_sq"].nbytes
                else:  # created at the first step as zeros_like(p), twice
                    moments += 2 * p.nbytes
    return StaticMemory(sum(storages.values()), grads, main, moments)


def _estimate(cfg, layout: Layout) -> tuple[StaticMemory, float, int]:
    """(static estimate for rank 0, peak activation estimate, micro-batches per step)."""
    param_bytes = torch.empty(0, dtype=resolve_dtype(cfg.training.precision)).element_size()
    static = static_memory(
        cfg.model,
        layout,
        ps.get_pipeline_model_parallel_rank(),
        param_bytes=param_bytes,
        distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        grad_bytes=GRAD_BYTES[cfg.optimizer.grad_reduce_dtype],
    )
    t = cfg.training
    m = t.global_batch_size // (t.micro_batch_size * layout.dp)
    opts = ActivationOptions(
        seq_len=cfg.data.seq_length,
        micro_batch=t.micro_batch_size,
        act_bytes=param_bytes,
        backend=resolve_backend(cfg.model),
        moe_load_factor=1.0,
    )
    act = activation_memory(cfg.model, layout, ps.get_pipeline_model_parallel_rank(), m, opts)
    return static, act.total, m


def log_memory_check(trainer) -> None:
    """Log estimate vs measurement on rank 0 (see the module docstring); other ranks return.

    A diagnostic: any failure is logged as a warning and training goes on.
    """
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    try:
        _log_memory_check(trainer)
    except Exception as e:  # noqa: BLE001 - never stop a run for a diagnostic
        log.warning("memory estimate skipped: %s: %s", type(e).__name__, e)


def _log_memory_check(trainer) -> None:
    cfg = trainer.cfg
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = Layout.from_parallel(cfg.parallel, world)
    est, act, m = _estimate(cfg, layout)
    got = measure_static(trainer.model, trainer.optimizer)
    exact = (est.params_bytes, est.grad_bytes, est.optimizer_bytes) == (
        got.params_bytes,
        got.grad_bytes,
        got.optimizer_bytes,
    )
    log.info(
        "memory (rank 0, %s): estimate params %s, grads %s, optimizer %s, activations %s "
        "(peak, %d micro-batches/step); measured params %s, grads %s, optimizer %s (%s)",
        layout.label(),
        _mib(est.params_bytes),
        _mib(est.grad_bytes),
        _mib(est.optimizer_bytes),
        _mib(act),
        m,
        _mib(got.params_bytes),
        _mib(got.grad_bytes),
        _mib(got.optimizer_bytes),
        "static estimate exact" if exact else "static estimate DIFFERS",
    )
    if torch.cuda.is_available():
        _after_first_step(trainer.optimizer, est.total_bytes + act)


def _after_first_step(optimizer, estimate: float) -> None:
    """Log max_memory_allocated beside `estimate` once, after the first optimizer step."""
    inner = _inner_optimizers(optimizer)
    if not inner:
        return
    handle = None

    def hook(*_args) -> None:
        peak = torch.cuda.max_memory_allocated()
        log.info(
            "memory after step 1 (rank 0): max allocated %s, estimate %s (%+.1f%%)",
            _mib(peak),
            _mib(estimate),
            100 * (estimate / peak - 1) if peak else 0.0,
        )
        handle.remove()

    handle = inner[-1].optimizer.register_step_post_hook(hook)
