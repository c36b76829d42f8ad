"""The training loop: `kat train examples/tiny_pretrain/config.yaml [key=value ...] [--nproc N]`.

`Trainer(cfg, build_datasets, forward_step)` is handed what its stage contributes (the registry
in `kat_megatron/stages.py` chooses; pretraining's by default). Build (process groups, model
chunks, DDP, optimizer, scheduler, data) -> resume -> for each step: run Megatron-Core's
forward-backward schedule over the step's micro-batches (`forward_backward`), optimizer step,
scheduler step, metrics, periodic checkpoint. A SIGTERM/SIGUSR1 (SLURM's pre-timeout signal)
finishes the current step, saves a checkpoint and exits with `EXIT_PREEMPTED`.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from kat_megatron.config import KatConfig, config_to_dict, dump_config, format_config
from kat_megatron.losses.lm import masked_token_loss
from kat_megatron.models.builder import build_model, recompute_overrides, transformer_config
from kat_megatron.models.packed_seq import padded_length
from kat_megatron.parallel.init import initialize
from kat_megatron.planning.runtime import log_memory_check
from kat_megatron.training import checkpointing as ckpt
from kat_megatron.training.batches import step_batches
from kat_megatron.training.checkpoint_meta import (
    checkpoint_dir,
    latest_checkpoint,
    resolve_checkpoint,
)
from kat_megatron.training.datasets import pretrain_datasets
from kat_megatron.training.metrics import MetricsLogger
from kat_megatron.training.optimizer import build_optimizer, wrap_ddp

log = logging.getLogger("kat")
EXIT_PREEMPTED = 42


@dataclass
class TrainState:
    """What a checkpoint must restore besides weights and optimizer."""

    step: int = 0
    consumed_samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopFlag:
    """Set by SIGTERM/SIGUSR1; checked (and agreed on by all ranks) after each step."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. in some test harnesses)
                pass

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: will checkpoint after this step and exit", signum)
        self.raised = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def lm_forward_step(data_iterator, model, loss_fn=masked_token_loss):
    """Megatron-Core forward step of stages pretrain and sft: one micro-batch through the model,
    and its loss function.

    `packed_seq_params` (THD rows, `data.packing`: attention per document) or `attention_mask`
    ([b, 1, s, s], True = masked: packed SFT rows without THD) is passed when the batch has one;
    otherwise the model's causal mask applies.
    """
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
        packed_seq_params=batch.get("packed_seq_params"),
    )
    return output, partial(loss_fn, loss_mask_bs=batch["loss_mask"])


def forward_backward(
    model: list,
    optimizer,
    forward_step: Callable,
    data_iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    **schedule_kwargs,
) -> tuple[list, bool, float | None]:
    """One optimizer step over `num_microbatches` micro-batches: zero the gradient buffers,
    run Megatron-Core's schedule (no pipelining, 1F1B or interleaved, as the groups say) and
    step the optimizer. Returns (the loss functions' outputs, whether the step was applied, the
    gradient norm)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
        **schedule_kwargs,
    )
    ok, grad_norm, _ = optimizer.step()
    return losses, ok, float(grad_norm) if grad_norm is not None else None


def reduce_metrics(losses: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of every `[sum, count]` metric the loss function returned over the global batch
    (summed over micro-batches and data-parallel ranks), known on every rank.

    Only the last pipeline stage's TP rank 0 contributes (the losses are replicated over TP);
    the other ranks learn the metric names through one small all-gather of objects.
    """
    local: dict[str, torch.Tensor] = {}
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if last and parallel_state.get_tensor_model_parallel_rank() == 0:
        for item in losses:
            for key, pair in item.items():
                local[key] = local.get(key, torch.zeros(2)) + pair.detach().float().cpu()
    keys = sorted(local)
    if dist.is_initialized():
        names: list = [None] * dist.get_world_size()
        dist.all_gather_object(names, keys)
        keys = sorted(set().union(*names))
    total = torch.stack([local.get(k, torch.zeros(2)) for k in keys]) if keys else torch.zeros(0, 2)
    if dist.is_initialized() and keys:
        total = total.to("cuda") if torch.cuda.is_available() else total
        dist.all_reduce(total)
    total = total.cpu()
    return {k: (total[i, 0] / total[i, 1].clamp(min=1)).item() for i, k in enumerate(keys)}


def reduce_loss(losses: list[dict[str, torch.Tensor]]) -> float:
    """Token-mean LM loss of the global batch, known on every rank."""
    return reduce_metrics(losses).get("lm_loss", 0.0)


class Trainer:
    """Owns one run: `Trainer(cfg).run()` returns the list of per-step metrics dicts.

    `build_datasets(cfg, run_dir) -> (train, valid, test)` and `forward_step` are the stage's
    (`datasets` given instead: those, e.g. in tests). Subclasses (a stage's own trainer, e.g.
    `kat_megatron.rl.trainer.RLTrainer`) override `train_step` and the `extra_state` /
    `load_extra_state` checkpoint hooks."""

    def __init__(
        self,
        cfg: KatConfig,
        build_datasets: Callable[[KatConfig, Path], tuple] = pretrain_datasets,
        forward_step: Callable = lm_forward_step,
        datasets=None,
    ) -> None:
        self.cfg = cfg
        self.forward_step = forward_step
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.dp = initialize(cfg.parallel, cfg.training.seed, cfg.model)
        self.rank = dist.get_rank()
        tcfg = transformer_config(
            cfg.model,
            cfg.parallel,
            cfg.training.precision,
            calculate_per_token_loss=True,
            **recompute_overrides(cfg.training.recompute, cfg.model),
            **self.model_overrides(cfg),
        )
        chunks = build_model(cfg.model, cfg.parallel, cfg.training.precision, config=tcfg)
        self.model = wrap_ddp(cfg, chunks)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        self.datasets = datasets if datasets is not None else build_datasets(cfg, self.run_dir)
        self.state = TrainState()
        self.stop = _StopFlag()

    @staticmethod
    def model_overrides(cfg: KatConfig) -> dict:
        """Extra TransformerConfig fields of the trained model (a stage's trainer may add)."""
        return {}

    def _resume(self) -> None:
        cfg = self.cfg
        resume = cfg.checkpoint.resume
        if resume == "auto":
            latest = latest_checkpoint(self.ckpt_root)
        elif resume == "none":
            latest = None
        else:
            latest = resolve_checkpoint(resume)  # an iter_N, a checkpoints folder or a run dir
        if latest is not None:
            extra = ckpt.load_checkpoint(latest, self.model, self.optimizer, self.scheduler)
            self.state.step = int(extra["step"])
            self.state.consumed_samples = int(extra["consumed_samples"])
            self.load_extra_state(extra)
            log.info("resumed from %s (step %d)", latest, self.state.step)
        elif cfg.checkpoint.load:
            ckpt.load_checkpoint(cfg.checkpoint.load, self.model)
            self.optimizer.reload_model_params()
            log.info("initialised weights from %s", cfg.checkpoint.load)

    def extra_state(self) -> dict[str, Any]:
        """Hook: JSON-able state a subclass adds to the checkpoint (kat_meta.json and the
        common state), handed back to `load_extra_state` on resume."""
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Hook: restore what `extra_state` saved (called on resume, after the weights)."""

    def _save(self) -> None:
        extra = {
            "consumed_samples": self.state.consumed_samples,
            "config": config_to_dict(self.cfg),
            **self.extra_state(),
        }
        ckpt.save_checkpoint(
            self.ckpt_root,
            self.state.step,
            self.model,
            self.optimizer,
            self.scheduler,
            extra,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    def train_step(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.training
        dp_rank = parallel_state.get_data_parallel_rank()
        n_micro = t.global_batch_size // (t.micro_batch_size * self.dp)
        iters = [
            step_batches(
                self.datasets[0],
                self.state.consumed_samples,
                t.global_batch_size,
                t.micro_batch_size,
                dp_rank,
                self.dp,
                multiple=cfg.parallel.tp,
            )
            for _ in self.model
        ]
        # The activation shape pipeline stages exchange: THD rows are [1, mbs * s (padded)].
        seq, mbs = cfg.data.seq_length, t.micro_batch_size
        if getattr(self.datasets[0], "thd", False):
            seq, mbs = padded_length(mbs * seq, cfg.parallel.tp), 1
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step is taken with
        losses, ok, grad_norm = forward_backward(
            self.model,
            self.optimizer,
            self.forward_step,
            iters if len(iters) > 1 else iters[0],
            n_micro,
            seq,
            mbs,
            decoder_seq_length=seq,
        )
        if ok:
            self.scheduler.step(increment=1)
        reduced = reduce_metrics(losses)
        loss = reduced.pop("lm_loss", 0.0)
        elapsed = time.perf_counter() - start
        self.state.step += 1
        self.state.consumed_samples += t.global_batch_size
        row = {
            "step": self.state.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": not ok,
            "step_time_s": elapsed,
            "tokens_per_s": t.global_batch_size * cfg.data.seq_length / elapsed,
            "consumed_samples": self.state.consumed_samples,
        }
        # The stage's other metrics (e.g. kd_kl_d1), after the loop's own keys (which win).
        row.update({k: v for k, v in reduced.items() if k not in row})
        return row

    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        writer = self.rank == 0
        if writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
            log.info("resolved config:\n%s", format_config(cfg))
        self._resume()
        log_memory_check(self)  # `kat plan`'s estimate beside what rank 0 allocated
        metrics = MetricsLogger(cfg, self.run_dir, self.state.step, writer)
        interval = cfg.checkpoint.save_interval
        preempted = False
        try:
            while self.state.step < cfg.training.steps:
                m = self.train_step()
                self.state.history.append(m)
                if m["step"] % cfg.logging.interval == 0 or m["step"] == cfg.training.steps:
                    metrics.log(m)
                if self.stop.any_rank():
                    preempted = True
                    break
                if interval and self.state.step % interval == 0:
                    self._save()
                exit_every = cfg.training.exit_interval
                if exit_every and self.state.step % exit_every == 0:
                    log.info(
                        "training.exit_interval=%d reached at step %d", exit_every, self.state.step
                    )
                    break
            if cfg.checkpoint.save or preempted or cfg.training.exit_interval:
                if latest_checkpoint(self.ckpt_root) != checkpoint_dir(
                    self.ckpt_root, self.state.step
                ):
                    self._save()
        finally:
            metrics.close()
        if preempted:
            raise SystemExit(EXIT_PREEMPTED)
        return self.state.history
