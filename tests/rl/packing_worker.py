"""RL training steps on padded and on packed (THD) micro-batches, for tests/rl/test_packing.py:

    python -m torch.distributed.run --nproc-per-node N tests/rl/packing_worker.py TP VARIANT OUT

VARIANT `padded` or `packed` (one per process: the gloo group is not re-created in a process).
tiny-dense built from seed 5 (the same weights for both variants),
Megatron-Core DDP and Adam (`training/optimizer.py`), then two optimizer steps of the trainer's
own path (`microbatches` -> `forward_backward` with `rl_forward_step`) over the same mixed-length
rollouts (2 micro-batches of 4, lengths 9..120 positions; one micro-batch slot empty), with a
sequence-mean aggregation, an entropy bonus, a KL term to reference log-probs, the truncated IS
correction and old log-probs (so every per-token input of the loss is used), plus the
forward-only log-probs (`forward_logprobs`) of the response tokens before the first step.
Rank 0 writes {"loss": [..], "grad_norm": [..], "logprobs": [..], "rows": [..]} to OUT.
"""

from __future__ import annotations

import json
import os
import random
import sys
from functools import partial
from pathlib import Path

import torch


def rollouts():
    from kat_megatron.rl.batching import RolloutSample

    rng = random.Random(0)
    out = []
    for _ in range(7):
        p, r = rng.randint(4, 40), rng.randint(6, 80)
        out.append(
            RolloutSample(
                [rng.randint(5, 500) for _ in range(p)],
                [rng.randint(5, 500) for _ in range(r)],
                [rng.gauss(0, 1) for _ in range(r)],
                [-rng.random() * 6 for _ in range(r)],
                ref_logprobs=[-rng.random() * 6 for _ in range(r)],
                old_logprobs=[-rng.random() * 6 for _ in range(r)],
            )
        )
    return out


def run(tp: int, packed: bool) -> dict:
    from kat_megatron.config import KatConfig, ModelConfig, OptimizerConfig, ParallelConfig
    from kat_megatron.config.presets import get_preset
    from kat_megatron.losses.policy import PolicyLossConfig
    from kat_megatron.models.builder import build_model, transformer_config
    from kat_megatron.parallel.init import initialize, shutdown
    from kat_megatron.rl.batching import microbatches, pad_multiple_for, response_values
    from kat_megatron.rl.logprobs import forward_logprobs, rl_forward_step
    from kat_megatron.training.loop import forward_backward, reduce_metrics
    from kat_megatron.training.optimizer import build_optimizer, wrap_ddp

    model_cfg = ModelConfig(**get_preset("tiny-dense"))
    par = ParallelConfig(tp=tp)
    cfg = KatConfig(
        model=model_cfg,
        parallel=par,
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, weight_decay=0.0),
    )
    initialize(par, seed=5, model=model_cfg)
    tcfg = transformer_config(model_cfg, par, "fp32", calculate_per_token_loss=True)
    model = wrap_ddp(cfg, build_model(model_cfg, par, "fp32", config=tcfg))
    optimizer, _ = build_optimizer(cfg, model)
    loss_cfg = PolicyLossConfig(
        aggregation="seq_mean_token_mean",
        entropy_coef=0.01,
        kl_coef=0.05,
        is_correction="truncated",
    )
    samples = rollouts()
    mult = pad_multiple_for(tp)
    batches = microbatches(samples, 4, 2, 0, mult, with_ref=True, with_old=True, packed=packed)
    logp = []
    for k, values in enumerate(forward_logprobs(model, batches)):
        chunk = samples[k * 4 : (k + 1) * 4]
        logp += [x for v in response_values(values, chunk + [None] * (4 - len(chunk))) if v
                 for x in v]  # fmt: skip
    result = {"loss": [], "grad_norm": [], "logprobs": logp, "rows": []}
    for _ in range(2):
        result["rows"] = [list(b["tokens"].shape) for b in batches]
        losses, ok, grad_norm = forward_backward(
            model,
            optimizer,
            partial(rl_forward_step, cfg=loss_cfg),
            iter(batches),
            len(batches),
            max(b["tokens"].shape[1] for b in batches),
            batches[0]["tokens"].shape[0],
        )
        assert ok
        result["loss"].append(reduce_metrics(losses)["loss"])
        result["grad_norm"].append(grad_norm)
    shutdown()
    return result


def main() -> None:
    from kat_megatron.utils.logging import setup_logging

    setup_logging("WARNING")
    tp, variant, out_path = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    assert variant in ("padded", "packed"), variant
    result = run(tp, variant == "packed")
    if int(os.environ.get("RANK", "0")) == 0:
        out_path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
