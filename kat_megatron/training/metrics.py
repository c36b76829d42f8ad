"""Per-step metrics of `kat train`: console, `<run.dir>/metrics.jsonl`, TensorBoard and wandb.

Only the writer rank (global rank 0) writes. On resume, lines of `metrics.jsonl` for steps after
the resumed checkpoint are dropped first, so the file holds each step once.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from kat_megatron.config.schema import KatConfig
from kat_megatron.utils.io import atomic_write_text

log = logging.getLogger("kat")


def _truncate_after(path: Path, step: int) -> None:
    """Drop rows of steps after `step` (and lines torn by a crash) before a resumed run appends."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    atomic_write_text(path, "".join(x + "\n" for x in keep))


class MetricsLogger:
    """Fans one metrics dict per step out to every configured sink."""

    def __init__(self, cfg: KatConfig, run_dir: Path, start_step: int, writer: bool) -> None:
        self.writer = writer
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not writer:
            return
        _truncate_after(self.path, start_step)
        self.file = open(self.path, "a")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.logging.wandb:
            self.wandb = _init_wandb(cfg, run_dir)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.writer:
            return
        step = metrics["step"]
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            if self.tb is not None:
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        parts = [f"step {step}"]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            if key in metrics and metrics[key] is not None:
                parts.append(f"{key} {metrics[key]:.4g}")
        log.info(" | ".join(parts))

    def close(self) -> None:
        if not self.writer:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(cfg: KatConfig, run_dir: Path):
    """wandb run that resumes under the same id (stored in the run dir) after a requeue."""
    import wandb

    id_file = run_dir / "wandb_id.txt"
    run_id = cfg.logging.wandb_run_id or (id_file.read_text().strip() if id_file.exists() else None)
    run_id = run_id or uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    from kat_megatron.config import config_to_dict

    return wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.run.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config_to_dict(cfg),
    )
