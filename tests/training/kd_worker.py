"""Worker for tests/training/test_kd_stage.py (real gloo ranks, Megatron-Core models):

    python -m torch.distributed.run --nproc-per-node 2 tests/training/kd_worker.py heads OUT.json
    python tests/training/kd_worker.py eval OUT.json DATA_PREFIX NUM_SAMPLES CKPT [CKPT ...]

`heads`: a tiny student with D = 2 MTP depths at TP = 2 (sequence parallel). Megatron-Core's own
forward with labels gives the main head's per-token CE and, through its MTP loss tracker, each
depth's mean CE; backward of its loss (the MTP CE enters through `MTPLossAutoScaler`, scale 1)
gives the gradients. Stage kd's path (`model_heads` + `mtp_kd_loss` with alpha = 0 and no
document masking: the same objective) must reproduce the values and every parameter gradient.
`eval`: the main head's token-mean cross-entropy of each checkpoint on the first NUM_SAMPLES
samples of another corpus (held-out data), one rank.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def heads(out: str) -> None:
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import (
        MTPLossAutoScaler,
        MTPLossLoggingHelper,
    )

    from kat_megatron.config.schema import ModelConfig, ParallelConfig
    from kat_megatron.losses.kd import KDConfig, mtp_kd_loss
    from kat_megatron.models.builder import build_model, transformer_config
    from kat_megatron.models.forward import model_heads
    from kat_megatron.parallel.init import initialize, shutdown

    model_cfg = ModelConfig(preset="tiny-dense", num_layers=2, mtp_num_layers=2)
    parallel = ParallelConfig(tp=dist.get_world_size() if dist.is_initialized() else 2)
    initialize(parallel, 1234, model_cfg)
    lam, depth, s, b = 0.6, 2, 16, 2
    tcfg = transformer_config(
        model_cfg, parallel, "fp32", calculate_per_token_loss=True, mtp_loss_scaling_factor=lam
    )
    (gpt,) = build_model(model_cfg, parallel, "fp32", config=tcfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model_cfg.vocab_size, (b, s + 1), generator=g)
    mask = torch.ones(b, s)
    mask[1, -3:] = 0  # a padded tail
    batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": mask,
             "position_ids": torch.arange(s).expand(b, -1)}  # fmt: skip

    loss_bs = gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                  loss_mask=mask)  # fmt: skip
    tracked = MTPLossLoggingHelper.tracker["values"].clone()
    MTPLossAutoScaler.set_loss_scale(torch.ones(1))
    (loss_bs * mask).sum().backward()
    mcore_grads = {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}
    gpt.zero_grad(set_to_none=True)

    _, logits = model_heads(gpt, batch)
    group = parallel_state.get_tensor_model_parallel_group()
    loss, count, metrics = mtp_kd_loss(
        logits, batch["labels"], mask, None, KDConfig(alpha=0.0, mtp_loss_scaling_factor=lam),
        documents=None, vocab_size=model_cfg.vocab_size, group=group,
    )  # fmt: skip
    loss.backward()
    ours = {n: p.grad for n, p in gpt.named_parameters() if p.grad is not None}
    result = {
        "num_heads": len(logits),
        "logits_shape": list(logits[0].shape),
        "mcore_main_sum": float((loss_bs * mask).sum()),
        "ours_main_sum": float(metrics["kd_ce_d0"][0]),
        "mcore_mtp_means": tracked.tolist(),
        "ours_mtp_means": [
            float(metrics[f"kd_ce_d{d}"][0] / metrics[f"kd_ce_d{d}"][1])
            for d in range(1, depth + 1)
        ],  # fmt: skip
        "count": int(count),
        "grad_names": sorted(mcore_grads) == sorted(ours) and len(ours) > 0,
        "grad_max_abs_diff": max(float((mcore_grads[n] - ours[n]).abs().max()) for n in ours),
        "grad_max_abs": max(float(ours[n].abs().max()) for n in ours),
        "mtp_grads": sum(1 for n in ours if n.startswith("mtp.")),
    }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    shutdown()


def evaluate(out: str, prefix: str, num_samples: str, *ckpts: str) -> None:
    from kat_megatron.checkpoint.mcore_io import read_meta
    from kat_megatron.config.schema import DataConfig, ModelConfig, ParallelConfig
    from kat_megatron.data.gpt_data import build_gpt_datasets
    from kat_megatron.models.builder import build_model
    from kat_megatron.models.forward import model_heads
    from kat_megatron.parallel.init import initialize, shutdown
    from kat_megatron.training.batches import collate
    from kat_megatron.training.checkpointing import load_checkpoint

    initialize(ParallelConfig(), 1234)
    n = int(num_samples)
    losses = {}
    for ckpt in ckpts:
        model_cfg = ModelConfig(**read_meta(ckpt)["config"]["model"])
        data = DataConfig(paths=[prefix], seq_length=64, split="100,0,0")
        ds, _, _ = build_gpt_datasets(data, 64, 1, (n, 0, 0), create_attention_mask=False)
        (gpt,) = build_model(model_cfg, ParallelConfig(), "fp32")
        load_checkpoint(ckpt, [gpt])
        gpt.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for start in range(0, n, 16):
                batch = collate([ds[i] for i in range(start, min(n, start + 16))])
                _, logits = model_heads(gpt, batch, max_heads=1)
                z = logits[0].transpose(0, 1)[..., : model_cfg.vocab_size].float()
                ce = F.cross_entropy(z.flatten(0, 1), batch["labels"].flatten(), reduction="none")
                total += float((ce * batch["loss_mask"].flatten()).sum())
                count += float(batch["loss_mask"].sum())
        losses[ckpt] = total / count
    with open(out, "w") as f:
        json.dump(losses, f)
    shutdown()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"heads": heads, "eval": evaluate}[mode](*rest)
