"""Numerics of the RL trainer's forward step on gloo ranks (run by tests/rl/test_rl_stage.py):

    python -m torch.distributed.run --nproc-per-node 2 tests/rl/rl_worker.py CKPT OUT.json

At TP=2 (sequence parallel, fp32), from checkpoint CKPT:
- rollouts from the colocated `RolloutEngine` (temperature 1), then the trainer's log-probs of
  the same tokens through `forward_logprobs` (the training forward with vocab-sharded logits):
  max |rollout - trainer| over response tokens;
- `rl_forward_step` + `rl_loss` with `is_correction="truncated"`: mean exp(old - rollout);
- against a full-vocabulary torch reference (logits gathered over TP): log-probs and entropy;
- gradient of `vocab_parallel_entropy` on random sharded logits against autograd of the
  full-vocabulary entropy.
Rank 0 writes the numbers to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from kat_megatron.config import ModelConfig, ParallelConfig
    from kat_megatron.config.presets import get_preset
    from kat_megatron.data.synthetic_tasks import make_tasks, prompt_record
    from kat_megatron.data.tokenizer import load_tokenizer
    from kat_megatron.inference.engine import RolloutEngine
    from kat_megatron.inference.types import SamplingParams
    from kat_megatron.losses.policy import PolicyLossConfig
    from kat_megatron.models.builder import build_model
    from kat_megatron.parallel.init import initialize, shutdown
    from kat_megatron.rl.batching import RolloutSample, collate_rollouts, response_values
    from kat_megatron.rl.logprobs import forward_logprobs, rl_forward_step, vocab_parallel_entropy
    from kat_megatron.rl.prompts import prompt_token_ids, validate_record
    from kat_megatron.training.checkpointing import load_checkpoint
    from kat_megatron.utils.logging import setup_logging

    setup_logging("WARNING")
    ckpt, out_path = sys.argv[1], Path(sys.argv[2])
    model_cfg = ModelConfig(**get_preset("tiny-dense"))
    par = ParallelConfig(tp=2)
    initialize(par, seed=11, model=model_cfg)
    model = build_model(model_cfg, par, "fp32")
    load_checkpoint(ckpt, model)
    tok = load_tokenizer("tiny")
    engine = RolloutEngine(model, tok, max_sequence_length=128, max_batch_size=16)
    records = [validate_record(prompt_record(e), f"t {i}") for i, e in enumerate(make_tasks(6, 4))]
    prompts = [prompt_token_ids(tok, r.messages) for r in records for _ in range(2)]
    stops = [tok.convert_tokens_to_ids("<|im_end|>")]
    params = SamplingParams(temperature=1.0, max_new_tokens=48, stop_token_ids=stops, seed=5)
    completions = engine.generate(prompts, params)
    samples = [
        RolloutSample(c.prompt_ids, c.token_ids, [1.0] * len(c.token_ids), c.logprobs)
        for c in completions
    ]
    batch = collate_rollouts(samples, pad_id=0, pad_multiple=16)
    trainer_lp = response_values(forward_logprobs(model, [batch])[0], samples)
    diffs = [
        abs(a - b) for s, lp in zip(samples, trainer_lp) for a, b in zip(s.rollout_logprobs, lp)
    ]
    result = {"tokens": len(diffs), "max_logprob_diff": max(diffs)}

    cfg = PolicyLossConfig(is_correction="truncated", entropy_coef=0.01)
    logits, loss_fn = rl_forward_step(iter([batch]), model[0], cfg=cfg)
    loss_sum, normaliser, metrics = loss_fn(logits)
    loss_sum.backward()  # the entropy bonus differentiates through the vocab-parallel entropy
    ratio = metrics["is_ratio_mean"]
    result["is_ratio_mean"] = (ratio[0] / ratio[1]).item()
    result["normaliser"] = int(normaliser)

    with torch.no_grad():
        logits = model[0](batch["tokens"], batch["position_ids"], None)
        full = gather_from_tensor_model_parallel_region(logits).float()
        ref_lp = torch.log_softmax(full, -1).gather(-1, batch["labels"].unsqueeze(-1))[..., 0]
        mask = batch["loss_mask"] > 0
        ours = forward_logprobs(model, [batch])[0]
        result["max_vs_full_vocab_logprob"] = (ours - ref_lp)[mask].abs().max().item()
        p = torch.softmax(full, -1)
        ref_h = -(p * torch.log_softmax(full, -1)).sum(-1)
        result["max_vs_full_vocab_entropy"] = (
            (vocab_parallel_entropy(logits) - ref_h).abs().max().item()
        )

    g = torch.Generator().manual_seed(0)
    z_full = (torch.randn(3, 5, 2 * 64, generator=g) * 3).requires_grad_()
    rank = parallel_state.get_tensor_model_parallel_rank()
    z_shard = z_full.detach()[..., rank * 64 : (rank + 1) * 64].clone().requires_grad_()
    weights = torch.rand(3, 5, generator=g)
    (vocab_parallel_entropy(z_shard) * weights).sum().backward()
    h_full = -(torch.softmax(z_full, -1) * torch.log_softmax(z_full, -1)).sum(-1)
    (h_full * weights).sum().backward()
    ref_grad = z_full.grad[..., rank * 64 : (rank + 1) * 64]
    err = (z_shard.grad - ref_grad).abs().max()
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    result["entropy_grad_max_err"] = err.item()
    result["entropy_grad_scale"] = ref_grad.abs().max().item()
    if dist.get_rank() == 0:
        out_path.write_text(json.dumps(result, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
