"""The estimate `kat train` logs at start-up: `pytest tests/planning/test_runtime.py`.

One in-process rank builds a tiny MoE run (bf16, MTP head) through `Trainer` and calls
`log_memory_check`; the logged static estimate must equal what the rank holds (the four-rank
layouts are checked in test_static_memory.py), and the measurement must agree with an
independent count made here from the trainer's tensors.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def trainer(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from step_overhead import RandomTokens

    from kat_megatron.config import load_config
    from kat_megatron.parallel.init import shutdown
    from kat_megatron.training.loop import Trainer

    cfg = load_config(
        None,
        [
            "model.preset=tiny-moe",
            "model.mtp_num_layers=1",
            "training.precision=bf16",
            "training.steps=1",
            "training.micro_batch_size=1",
            "training.global_batch_size=2",
            "data.seq_length=32",
            "checkpoint.save=false",
            "logging.tensorboard=false",
            f"run.dir={tmp_path}",
        ],
    )
    t = Trainer(cfg, datasets=(RandomTokens(16, 32, cfg.model.vocab_size), None, None))
    yield t
    shutdown()


def test_start_up_log_reports_exact_static_estimate(trainer):
    from kat_megatron.planning.runtime import log_memory_check, measure_static

    handler = _Capture()
    logger = logging.getLogger("kat")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        log_memory_check(trainer)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    line = next(m for m in handler.messages if m.startswith("memory (rank 0"))
    assert "static estimate exact" in line, line
    # the measurement itself, against a count made here: bf16 params in one padded buffer,
    # fp32 grads of the same length, fp32 main copy + two moments of the whole (DP = 1) buffer
    # minus padding, i.e. of every parameter
    got = measure_static(trainer.model, trainer.optimizer)
    buffers = [b for c in trainer.model for b in c.buffers]
    numel = sum(p.numel() for c in trainer.model for p in c.parameters())
    assert got.params_bytes == 2 * sum(b.numel for b in buffers)
    assert got.grad_bytes == 4 * sum(b.numel for b in buffers)
    assert got.optimizer_bytes == 12 * numel
