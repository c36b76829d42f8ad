"""Step-time overhead of kat's training loop over a bare Megatron-Core loop:

    .venv/bin/python benchmarks/step_overhead.py [--steps 30] [--hidden 256] [--layers 4]

Both loops run in this process on the same model shape, data and schedule: the bare loop is
written here against Megatron-Core only (DDP, `get_megatron_optimizer`, `get_forward_backward_func`
on pre-collated tensors); kat's loop is `Trainer.train_step` (sampler, collate, loss reduction,
scheduler, metrics). Steps alternate between the two so machine noise hits both alike. Prints
median seconds per step for each and the ratio kat / bare (goal: <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial

import torch


class RandomTokens:
    """A dataset of fixed random token sequences in the GPTDataset sample format."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.t = torch.randint(0, vocab, (n, seq + 1), generator=g)
        self.seq = seq

    def __len__(self) -> int:
        return len(self.t)

    def __getitem__(self, i: int) -> dict:
        x = self.t[i]
        return {
            "tokens": x[:-1],
            "labels": x[1:],
            "loss_mask": torch.ones(self.seq),
            "position_ids": torch.arange(self.seq),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()

    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kat_megatron.config import load_config
    from kat_megatron.models.builder import build_model, transformer_config
    from kat_megatron.training.loop import Trainer
    from kat_megatron.utils.logging import setup_logging

    setup_logging("WARNING")
    tmp = tempfile.mkdtemp()
    h = args.hidden
    cfg = load_config(
        None,
        [
            f"model.hidden_size={h}",
            f"model.ffn_hidden_size={4 * h}",
            f"model.num_layers={args.layers}",
            "model.num_attention_heads=8",
            "model.num_query_groups=2",
            "model.vocab_size=4096",
            f"data.seq_length={args.seq}",
            "training.micro_batch_size=2",
            "training.global_batch_size=4",
            f"training.steps={2 * args.steps + 10}",
            "logging.tensorboard=false",
            "checkpoint.save=false",
            f"run.dir={tmp}",
        ],
    )
    data = RandomTokens(8 * cfg.training.steps, args.seq, cfg.model.vocab_size)
    trainer = Trainer(cfg, datasets=(data, None, None))

    # --- the bare Megatron-Core loop ---
    tcfg = transformer_config(cfg.model, cfg.parallel, calculate_per_token_loss=True)
    model = build_model(cfg.model, cfg.parallel, config=tcfg)
    ddp = [
        DistributedDataParallel(
            tcfg,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
            model[0],
        )
    ]
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.no_sync_func = ddp[0].no_sync
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=cfg.optimizer.lr,
            weight_decay=0.1,
            clip_grad=1.0,
            use_distributed_optimizer=True,
        ),
        ddp,
    )
    mbs, gbs = cfg.training.micro_batch_size, cfg.training.global_batch_size
    batches = [data[i] for i in range(len(data))]
    stacked = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}

    def loss_fn(mask, out):
        s = (out.float() * mask).sum()
        n = mask.sum().long()
        return s, n, {"lm": torch.stack([s.detach(), n.float()])}

    def fwd(it, m):
        b = next(it)
        out = m(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return out, partial(loss_fn, b["loss_mask"])

    pos = [0]

    def bare_step():
        i = pos[0]
        micro = [
            {k: v[i + j * mbs : i + (j + 1) * mbs] for k, v in stacked.items()}
            for j in range(gbs // mbs)
        ]
        pos[0] += gbs
        ddp[0].zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(
            forward_step_func=fwd,
            data_iterator=iter(micro),
            model=ddp,
            num_microbatches=len(micro),
            seq_length=args.seq,
            micro_batch_size=mbs,
            forward_only=False,
        )
        opt.step()

    kat_t, bare_t = [], []
    for step in range(args.steps + 3):
        t0 = time.perf_counter()
        trainer.train_step()
        t1 = time.perf_counter()
        bare_step()
        t2 = time.perf_counter()
        if step >= 3:  # warm-up
            kat_t.append(t1 - t0)
            bare_t.append(t2 - t1)
    k, b = statistics.median(kat_t), statistics.median(bare_t)
    print(f"model: {args.layers} layers, hidden {h}, seq {args.seq}, {args.steps} timed steps each")
    print(f"bare Megatron-Core loop: {b * 1e3:.1f} ms/step (median)")
    print(f"kat Trainer.train_step:  {k * 1e3:.1f} ms/step (median)")
    print(f"ratio kat / bare: {k / b:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
