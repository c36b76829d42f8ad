"""Training stages selected by `stage:` in the config (`kat train cfg.yaml stage=sft`).

A stage supplies what differs between trainers that share the loop in `training/loop.py`:
its datasets and its forward step (model call and loss). Unknown names list the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from kat_megatron.config.schema import KatConfig
from kat_megatron.losses.lm import masked_token_loss


def forward_step(data_iterator, model, loss_fn=masked_token_loss):
    """Megatron-Core forward step: one micro-batch through the model, and its loss function.

    `attention_mask` ([b, 1, s, s], True = masked) is passed when the batch has one (packed
    SFT rows); otherwise the model's causal mask applies.
    """
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, partial(loss_fn, loss_mask_bs=batch["loss_mask"])


def _pretrain_data(cfg: KatConfig, run_dir: Path):
    """Megatron GPT datasets sized for the whole run (data repeats to reach the count)."""
    from kat_megatron.data.gpt_data import build_gpt_datasets

    t = cfg.training
    evals = t.steps // t.eval_interval + 1 if t.eval_interval else 1
    num_samples = (
        t.steps * t.global_batch_size,
        evals * t.eval_iters * t.global_batch_size,
        t.global_batch_size,
    )
    cache = cfg.data.cache_dir or str(run_dir / "data_cache")
    return build_gpt_datasets(
        cfg.data, cfg.data.seq_length, t.seed, num_samples, cache_dir=cache,
        create_attention_mask=False,
    )  # fmt: skip


def _sft_data(cfg: KatConfig, run_dir: Path):
    """Packed chat rows with per-document attention masks (loss on assistant tokens)."""
    from kat_megatron.data.sft_data import build_sft_dataset
    from kat_megatron.models.builder import resolve_backend

    if resolve_backend(cfg.model) == "te":
        raise ValueError(
            "stage sft with model.backend=te: packed rows need THD packed_seq_params, which "
            "kat does not wire up yet; use model.backend=local"
        )
    return build_sft_dataset(cfg.data, cfg.training.seed), None, None


def _kd_data(cfg: KatConfig, run_dir: Path):
    """Pretraining samples, plus the MTP-KD teacher (training/kd_stage.py)."""
    from kat_megatron.training.kd_stage import build_kd

    return build_kd(cfg, run_dir)


def _kd_forward_step(data_iterator, model):
    from kat_megatron.training.kd_stage import kd_forward_step

    return kd_forward_step(data_iterator, model)


def _rl_prompts(cfg: KatConfig, run_dir: Path):
    """The RL prompt records (`rl.prompts`), validated."""
    from kat_megatron.rl.prompts import load_prompts

    return (load_prompts(cfg.rl.prompts),)


def _rl_trainer(cfg: KatConfig):
    from kat_megatron.rl.trainer import RLTrainer

    return RLTrainer(cfg)


@dataclass(frozen=True)
class Stage:
    """What a stage contributes to the shared training loop."""

    name: str
    build_datasets: Callable[[KatConfig, Path], tuple]
    forward_step: Callable = forward_step
    trainer: Callable[[KatConfig], Any] | None = None
    """A trainer factory when the stage has its own loop (a `training.loop.Trainer` subclass)."""


STAGES = {
    "pretrain": Stage("pretrain", _pretrain_data),
    "sft": Stage("sft", _sft_data),
    "kd": Stage("kd", _kd_data, _kd_forward_step),
    "rl": Stage("rl", _rl_prompts, trainer=_rl_trainer),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"stage {name!r} has no trainer yet; available: {sorted(STAGES)}")
    return STAGES[name]
