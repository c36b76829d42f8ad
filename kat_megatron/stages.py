"""The stages `kat train` runs, selected by `stage:` in the config (`kat train cfg.yaml stage=sft`).

This registry is the one list of stage names. It sits above `training/` and `rl/`: a stage hands
the shared loop (`training.loop.Trainer`) its datasets and forward step, or is a trainer of its
own (`rl.trainer.RLTrainer`), and owns the checks that only it needs (`check`: cross-section
rules and the typed parts of `rl.*` / `kd.*`, run by `load_run_config` before any rank starts).

    from kat_megatron.stages import build_trainer, load_run_config
    build_trainer(load_run_config("examples/tiny_sft/config.yaml")).run()

Implementations are imported when a stage is used, so `kat submit` stays light.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kat_megatron.config import KatConfig, load_config


def _no_check(cfg: KatConfig) -> None:
    """Nothing beyond what the config sections check."""


def _check_pretrain(cfg: KatConfig) -> None:
    from kat_megatron.training.datasets import pretrain_packing

    pretrain_packing(cfg)


def _check_sft(cfg: KatConfig) -> None:
    from kat_megatron.training.datasets import sft_packing

    sft_packing(cfg)


def _check_kd(cfg: KatConfig) -> None:
    from kat_megatron.training.kd_stage import check_kd

    check_kd(cfg)


def _check_rl(cfg: KatConfig) -> None:
    from kat_megatron.rl.parts import check_rl

    check_rl(cfg)


def _pretrain_trainer(cfg: KatConfig):
    from kat_megatron.training.datasets import pretrain_stage_datasets
    from kat_megatron.training.loop import Trainer

    return Trainer(cfg, build_datasets=pretrain_stage_datasets)


def _sft_trainer(cfg: KatConfig):
    from kat_megatron.training.datasets import sft_datasets
    from kat_megatron.training.loop import Trainer

    return Trainer(cfg, build_datasets=sft_datasets)


def _kd_trainer(cfg: KatConfig):
    from kat_megatron.training.kd_stage import build_kd, kd_forward_step
    from kat_megatron.training.loop import Trainer

    return Trainer(cfg, build_datasets=build_kd, forward_step=kd_forward_step)


def _rl_trainer(cfg: KatConfig):
    from kat_megatron.rl.trainer import RLTrainer

    return RLTrainer(cfg)


@dataclass(frozen=True)
class Stage:
    """A stage: its name, what it trains, its checks and its trainer factory."""

    name: str
    summary: str
    trainer: Callable[[KatConfig], Any]
    """`trainer(cfg)`: a `training.loop.Trainer` (or subclass) ready to `run()`."""
    check: Callable[[KatConfig], None] = _no_check
    """Raise a one-line ValueError naming the field when `cfg` cannot run this stage."""


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "pretrain",
            "next-token LM on Megatron indexed data",
            _pretrain_trainer,
            _check_pretrain,
        ),
        Stage("kd", "MTP-enhanced knowledge distillation", _kd_trainer, _check_kd),
        Stage("sft", "supervised fine-tuning on packed chat rows", _sft_trainer, _check_sft),
        Stage("rl", "Step-SRPO / GRPO with megatron or vLLM rollouts", _rl_trainer, _check_rl),
    )
}


def get_stage(name: str) -> Stage:
    """The stage called `name`; an unknown name is a ValueError listing the known ones."""
    if name not in STAGES:
        close = difflib.get_close_matches(str(name), STAGES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"stage={name!r}: expected one of {list(STAGES)}{hint}")
    return STAGES[name]


def check_stage(cfg: KatConfig) -> None:
    """The config's stage exists and `cfg` passes that stage's checks."""
    get_stage(cfg.stage).check(cfg)


def load_run_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> KatConfig:
    """`config.load_config` plus `check_stage`: what `kat train`, `kat submit` and
    `kat kd dump-teacher --config` accept. Errors name the file, as `load_config`'s do."""
    cfg = load_config(path, overrides)
    try:
        check_stage(cfg)
    except ValueError as err:
        prefix = f"{os.fspath(path)}: " if path is not None else ""
        raise ValueError(f"{prefix}{err}") from None
    return cfg


def build_trainer(cfg: KatConfig):
    """The trainer of `cfg.stage` (checked first)."""
    check_stage(cfg)
    return get_stage(cfg.stage).trainer(cfg)
