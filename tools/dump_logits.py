"""Dump a checkpoint's logits on fixed tokens, at any layout:

    python -m torch.distributed.run --nproc-per-node 4 tools/dump_logits.py CONFIG.yaml \
        --ckpt runs/x/checkpoints/iter_0000010 --out logits.pt parallel.tp=2 parallel.pp=2

Loads the model weights of `--ckpt` (resharding to the layout given by the config/overrides),
runs a forward pass over `--batch` x `--seq` tokens drawn with `--seed`, and writes
`{"tokens", "logits"}` (logits [batch, seq, vocab] fp32, vocab padding removed) to `--out`.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument(
        "--ckpt", required=True, help="checkpoint: iter_N, a checkpoints folder or a run dir"
    )
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_intermixed_args()

    from megatron.core import parallel_state

    from kat_megatron.config import load_config
    from kat_megatron.models.forward import forward_logits
    from kat_megatron.parallel.init import initialize, shutdown
    from kat_megatron.training.checkpointing import load_frozen_model
    from kat_megatron.utils.logging import setup_logging

    setup_logging()
    cfg = load_config(args.config, args.overrides)
    initialize(cfg.parallel, cfg.training.seed, cfg.model)
    model = load_frozen_model(args.ckpt, cfg.model, cfg.parallel, cfg.training.precision)
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq), generator=g)
    logits = forward_logits(model, tokens)
    writer = (
        logits is not None
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
    if writer:
        tmp = f"{args.out}.tmp.{os.getpid()}"
        torch.save({"tokens": tokens, "logits": logits[..., : cfg.model.vocab_size]}, tmp)
        os.replace(tmp, args.out)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
