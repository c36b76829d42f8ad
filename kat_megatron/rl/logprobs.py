"""Per-token log-probs and entropy from vocab-sharded logits, and the RL forward step.

`kat train CFG.yaml` with `stage: rl` runs `rl_forward_step` under Megatron-Core's
`get_forward_backward_func`; `forward_logprobs` is the forward-only pass (reference model,
tests). Logits stay sharded over the tensor-parallel group (`[b, s, V/tp]`, the layout of
Megatron-Core's `ColumnParallelLinear` output layer) and the vocabulary is never gathered:
- log p(label) = -`tensor_parallel.vocab_parallel_cross_entropy` (all-reduce MAX and SUM);
- entropy H = log S - (sum_v e_v z_v) / S with z = logits - max, e = exp z, S = sum_v e_v:
  one all-reduce MAX and two SUMs over the TP group.
Both run in fp32 over every column of the padded vocabulary, as the rollout engine's log-probs
(`kat_megatron.inference.sampling.token_logprobs_b`) do, so the two agree to rounding.
A packed micro-batch (`rl.packing`, `rl/batching.py`) runs as one THD row with its
`packed_seq_params`; its per-token log-probs and entropy are put back into the padded `[b, s]`
layout (`batching.unpack`) before the loss, so `policy_loss` sees the padded path's tensors.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from kat_megatron.losses.policy import PolicyLossConfig, policy_loss
from kat_megatron.rl import router_replay
from kat_megatron.rl.batching import unpack


def _tp_group() -> Any:
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_entropy(logits_bsv: torch.Tensor) -> torch.Tensor:
    """Entropy `[b, s]` (fp32, nats) of softmax(logits) with the vocabulary sharded over TP.

    Differentiable: the partial sums go through `reduce_from_tensor_model_parallel_region`
    (all-reduce forward, identity backward), so each rank back-propagates into its own shard.
    """
    z = logits_bsv.float()
    with torch.no_grad():
        m = z.max(dim=-1, keepdim=True).values
        group = _tp_group()
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    z = z - m
    e = torch.exp(z)
    s_sum = e.sum(dim=-1)
    ez_sum = (e * z).sum(dim=-1)
    if _tp_group() is not None:
        s_sum = reduce_from_tensor_model_parallel_region(s_sum)
        ez_sum = reduce_from_tensor_model_parallel_region(ez_sum)
    return torch.log(s_sum) - ez_sum / s_sum


def token_logprobs(
    logits_bsv: torch.Tensor,
    labels_bs: torch.Tensor,
    with_entropy: bool = True,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(labels) `[b, s]`, entropy `[b, s]` or None), fp32, from TP-sharded logits.

    Gradients flow into the log-probs; into the entropy only with `entropy_grad`.
    """
    entropy = None
    if with_entropy:
        if entropy_grad:
            entropy = vocab_parallel_entropy(logits_bsv)
        else:
            with torch.no_grad():
                entropy = vocab_parallel_entropy(logits_bsv)
    # Megatron's cross-entropy works in place on its input: give it its own fp32 copy.
    logits = logits_bsv.float()
    if logits is logits_bsv:
        logits = logits.clone()
    nll_bs = tensor_parallel.vocab_parallel_cross_entropy(logits, labels_bs)
    return -nll_bs, entropy


def rl_loss(
    logits_bsv: torch.Tensor, batch: dict[str, torch.Tensor], cfg: PolicyLossConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss function of one micro-batch: `policy_loss` on the response tokens.

    Old log-probs are `batch["old_logprobs"]` when the trainer takes several updates per
    rollout batch (the policy before the first of them); with one update the policy that
    sampled is the one being differentiated, so they are this forward's own values, detached
    (ratio 1, gradient = the policy gradient). The rollout engine's log-probs enter through
    `is_correction`. Metrics are `[sum, count]` pairs, plus `loss` = [loss_sum, normaliser].
    """
    logp_bs, entropy_bs = token_logprobs(
        logits_bsv, batch["labels"], with_entropy=True, entropy_grad=cfg.entropy_coef != 0
    )
    logp_bs, entropy_bs = unpack(logp_bs, batch), unpack(entropy_bs, batch)
    old_bs = batch.get("old_logprobs")
    loss_sum, normaliser, metrics = policy_loss(
        logp_bs,
        logp_bs.detach() if old_bs is None else old_bs,
        batch["advantages"],
        batch["loss_mask"],
        cfg,
        ref_logprobs_bt=batch.get("ref_logprobs"),
        rollout_logprobs_bt=batch["rollout_logprobs"],
        entropy_bt=entropy_bs,
    )
    metrics = dict(metrics)
    metrics.update(logprob_mismatch(old_bs, logp_bs, batch["rollout_logprobs"], batch["loss_mask"]))
    metrics["loss"] = torch.stack([loss_sum.detach().float(), normaliser.detach().float()])
    return loss_sum, normaliser.to(torch.int), metrics


DIFF_MEAN, DIFF_MAX = "rollout/logprob_diff_mean", "rollout/logprob_diff_max"
"""Metric names of the rollout engine's log-probs against the trainer's (`logprob_mismatch`)."""


def logprob_mismatch(
    old_bs: torch.Tensor | None,
    logp_bs: torch.Tensor,
    rollout_bs: torch.Tensor,
    mask_bs: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """|rollout - trainer| log-prob over the response tokens: `DIFF_MEAN` as a `[sum, count]`
    pair, `DIFF_MAX` as `[max, 1]` (the trainer takes its max over micro-batches and ranks
    before `reduce_metrics`). The trainer's value is the policy before the step's first update:
    `old_bs` when given (several updates per step), else this forward's own log-probs."""
    trainer = (old_bs if old_bs is not None else logp_bs).detach().float()
    valid = mask_bs.detach() > 0
    diff = torch.where(valid, (rollout_bs.detach().float() - trainer).abs(), 0.0)
    one = torch.ones((), dtype=torch.float32, device=diff.device)
    return {
        DIFF_MEAN: torch.stack([diff.sum(), valid.float().sum()]),
        DIFF_MAX: torch.stack([diff.max() if diff.numel() else 0 * one, one]),
    }


def rl_forward_step(data_iterator, model, cfg: PolicyLossConfig):
    """Megatron-Core forward step: the micro-batch through the policy, and `rl_loss`."""
    batch = next(data_iterator)
    logits_bsv = _policy_logits(model, batch)
    return logits_bsv, partial(rl_loss, batch=batch, cfg=cfg)


def _policy_logits(model, batch: dict) -> torch.Tensor:
    """Vocab-sharded logits `[b, s, V/tp]` (`[1, t, V/tp]` for a packed batch)."""
    params = batch.get("packed_seq_params")
    with router_replay.replaying(batch):  # MoE router replay: the rollout's experts
        return model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)


@torch.no_grad()
def forward_logprobs(model: list, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """log p(labels) `[b, s]` of each micro-batch through Megatron-Core's forward-only schedule.

    Every rank of the model-parallel group gets the same values: at PP > 1 the last stage
    computes them and broadcasts them over the pipeline (the model's config must have
    `variable_seq_lengths`: micro-batches differ in length, `RLTrainer.model_overrides`).
    """
    if not batches:
        return []
    values = _forward_logprobs(model, batches)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [values if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None]
        dist.broadcast_object_list(
            box,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        values = box[0]
    return values


def _forward_logprobs(model: list, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """`forward_logprobs` on this rank (the last pipeline stage's values; [] on the others)."""

    def step(data_iterator, chunk):
        batch = next(data_iterator)
        logits_bsv = _policy_logits(chunk, batch)

        def collect(output, non_loss_data=True):
            return unpack(token_logprobs(output, batch["labels"], with_entropy=False)[0], batch)

        return logits_bsv, collect

    was_training = [c.training for c in model]
    for chunk in model:
        chunk.eval()
    try:
        return get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(batches),
            model=model,
            num_microbatches=len(batches),
            seq_length=batches[0]["tokens"].shape[1],
            micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    finally:
        for chunk, training in zip(model, was_training):
            chunk.train(training)
