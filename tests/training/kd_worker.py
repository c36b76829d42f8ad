"""Worker for tests/training/test_kd_stage.py (real gloo ranks, Megatron-Core models):

    python -m torch.distributed.run --nproc-per-node 2 tests/training/kd_worker.py heads OUT.json
    python tests/training/kd_worker.py eval OUT.json DATA_PREFIX NUM_SAMPLES CKPT [CKPT ...]

`heads`: a tiny student with D = 2 MTP depths at TP = 2 (sequence parallel). Megatron-Core's own
forward with labels gives the main head's per-token CE and, through its MTP loss tracker, each
depth's mean CE; backward of its loss (the MTP CE enters through `MTPLossAutoScaler`, scale 1)
gives the gradients. Stage kd's path (`model_heads` + `mtp_kd_loss` with alpha = 0 and no
document masking: the same objective) must reproduce the values and every parameter gradient.
`packed`: stage kd's THD row (`kd.packing`, `packed_seq.eod_rows`) against a dense block-causal
mask built here from the EOD positions (the reference: attention within a document, up to the
query), same student (D = 2) and the same teacher logits: every head's logits at the positions
whose depth-d target is in the same document, the KD loss (alpha 0.5, document masking) and
every gradient; at TP = 1 or 2 (sequence parallel).
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


def packed(out: str) -> None:
    import os

    from megatron.core import parallel_state

    from kat_megatron.config.schema import ModelConfig, ParallelConfig
    from kat_megatron.losses.kd import (
        KDConfig,
        TeacherLogits,
        depth_valid_mask,
        documents_from_eod,
        mtp_kd_loss,
    )
    from kat_megatron.models.builder import build_model, transformer_config
    from kat_megatron.models.forward import model_heads
    from kat_megatron.models.packed_seq import eod_rows
    from kat_megatron.parallel.init import initialize, shutdown

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = ModelConfig(preset="tiny-dense", num_layers=2, mtp_num_layers=2)
    parallel = ParallelConfig(tp=tp)
    initialize(parallel, 1234, model_cfg)
    b, s, eod, depth = 2, 32, 0, 2
    tcfg = transformer_config(model_cfg, parallel, "fp32", calculate_per_token_loss=True)
    (gpt,) = build_model(model_cfg, parallel, "fp32", config=tcfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, model_cfg.vocab_size, (b, s + 1), generator=g)
    for row, cols in ((0, (5, 6, 20)), (1, (13,))):  # documents of 6, 1, 14, 12 / 14, 18 tokens
        x[row, list(cols)] = eod
    tokens, labels = x[:, :-1], x[:, 1:]
    mask = torch.ones(b, s)
    docs = documents_from_eod(tokens, eod)
    # Reference mask (True = masked): key k visible to query q iff same document and k <= q.
    same = docs.input_doc_bs[:, :, None] == docs.input_doc_bs[:, None, :]
    causal = torch.ones(s, s).tril().bool()
    dense = {"tokens": tokens, "position_ids": torch.arange(s).expand(b, -1),
             "attention_mask": ~(same & causal)[:, None]}  # fmt: skip
    thd = {"tokens": tokens, "position_ids": dense["position_ids"],
           "thd": eod_rows(tokens, eod, multiple=tp)}  # fmt: skip
    teacher = TeacherLogits(torch.randn(s, b, model_cfg.vocab_size // tp, generator=g))
    cfg = KDConfig(alpha=0.5, mtp_loss_scaling_factor=0.3)
    group = parallel_state.get_tensor_model_parallel_group()
    res = {"cu_seqlens": thd["thd"]["packed_seq_params"].cu_seqlens_q.tolist()}
    grads, losses, heads = {}, {}, {}
    for name, batch in (("dense", dense), ("thd", thd)):
        gpt.zero_grad(set_to_none=True)
        _, logits = model_heads(gpt, batch)
        loss, _, _ = mtp_kd_loss(logits, labels, mask, teacher, cfg, documents=docs,
                                 vocab_size=model_cfg.vocab_size, group=group)  # fmt: skip
        loss.backward()
        losses[name] = float(loss)
        heads[name] = [h.detach() for h in logits]
        grads[name] = {}
        for n, p in gpt.named_parameters():
            if p.grad is None:
                continue
            grad = p.grad.clone()
            if getattr(p, "sequence_parallel", False) and tp > 1:
                # Sequence-parallel params (norms) hold this rank's positions' share; the two
                # layouts split positions differently, so compare the TP sum (what Megatron-Core
                # reduces before the optimizer step).
                dist.all_reduce(grad, group=group)
            grads[name][n] = grad
    worst = 0.0
    for d in range(depth + 1):
        valid = depth_valid_mask(mask, d, docs)  # [b, s - d]
        a, r = heads["thd"][d][: s - d].transpose(0, 1), heads["dense"][d][: s - d].transpose(0, 1)
        worst = max(worst, float((a - r)[valid].abs().max() / r[valid].abs().max()))
    res.update(
        heads_shape=list(heads["thd"][0].shape),
        logits_rel=worst,
        loss_dense=losses["dense"],
        loss_thd=losses["thd"],
        grad_names=sorted(grads["dense"]) == sorted(grads["thd"]) and len(grads["thd"]) > 0,
        grad_rel=max(float((grads["thd"][n] - grads["dense"][n]).abs().max()) for n in grads["thd"])
        / max(float(v.abs().max()) for v in grads["dense"].values()),
    )
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)
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
    {"heads": heads, "packed": packed, "eval": evaluate}[mode](*rest)
