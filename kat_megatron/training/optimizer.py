"""Model wrapping, optimizer and LR schedule for `kat train`: Megatron-Core DDP, (distributed)
Adam from `get_megatron_optimizer`, and `OptimizerParamScheduler` (linear warmup + decay).
"""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig as MOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import MegatronModule

from kat_megatron.config.schema import KatConfig


def grad_reduce_in_fp32(cfg: KatConfig, params_dtype: torch.dtype) -> bool:
    """Megatron-Core DDP's `grad_reduce_in_fp32` for `optimizer.grad_reduce_dtype`.

    `bf16` keeps the gradient buffers (and their reduce-scatter / all-reduce) in the
    parameters' dtype, so it needs bf16 parameters: with `training.precision=auto` resolving
    to fp32 (CPU) or fp16 it is an error rather than a silent fp32 run."""
    if cfg.optimizer.grad_reduce_dtype == "fp32":
        return True
    if params_dtype != torch.bfloat16:
        raise ValueError(
            f"optimizer.grad_reduce_dtype=bf16 needs bf16 parameters, got {params_dtype} "
            f"(training.precision={cfg.training.precision}); use fp32"
        )
    return False


def wrap_ddp(cfg: KatConfig, chunks: list[MegatronModule]) -> list[DistributedDataParallel]:
    """Wrap each model chunk in Megatron-Core DDP (contiguous grad buffers, bucketed reduce)."""
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32(cfg, chunks[0].config.params_dtype),
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        fp8_param_gather=cfg.model.fp8_param,
        check_for_nan_in_grad=True,
        bucket_size=None,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_cfg,
                module=chunk,
                # Later chunks of an interleaved pipeline overlap with earlier ones.
                disable_bucketing=i > 0,
            )
        )
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = None
    if len(wrapped) > 1:
        config.no_sync_func = [m.no_sync for m in wrapped]
    else:
        config.no_sync_func = wrapped[0].no_sync
    return wrapped


def build_optimizer(cfg: KatConfig, model: list[DistributedDataParallel]):
    """Megatron-Core optimizer (Adam; distributed when configured) and its LR scheduler."""
    o = cfg.optimizer
    dtype = model[0].config.params_dtype
    mcfg = MOptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(mcfg, model)
    steps = cfg.training.steps
    decay = o.decay_steps if o.decay_steps is not None else max(steps - o.warmup_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=o.warmup_steps + decay,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
