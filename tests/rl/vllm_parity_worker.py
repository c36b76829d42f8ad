"""vLLM rollout engine against kat's engine on the same live weights (test_vllm_rollout.py):

    python -m torch.distributed.run --nproc-per-node N tests/rl/vllm_parity_worker.py \
        CKPT PROMPTS.jsonl OUT.json

Builds the policy as the RL trainer does (TP = N, sequence parallelism on at N > 1, fp32),
loads CKPT (or, with CKPT = "moe", a random MoE policy at EP = N: `MOE`), and wraps the live model in both engines: kat's colocated `RolloutEngine` and a
`VllmRolloutEngine` (worker on TP rank 0, refit buckets of 0.1 MiB so that the refit takes
several buckets and the embedding travels alone in a larger segment). Rank 0 writes to OUT.json:
- greedy completions of the first prompts of PROMPTS (chat-rendered) from both engines, and the
  smallest top-1 margin along kat's greedy path from a full forward (no near-ties);
- the trainer's log-probs (one full forward, `forward_logits`) of vLLM's greedy tokens and of
  seeded sampled tokens (temperature 0.8, top-p 0.9, top-k 40: vLLM must report the raw
  distribution's log-probs, as kat does);
- after an in-place weight change (the optimizer step's stand-in): vLLM before any refit
  (stale), then after `refit()`, against kat on the new weights;
- the refit's buckets, bytes and seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
import engine_worker as W  # noqa: E402

MAX_NEW = 24
MOE = "moe"
"""CKPT = "moe": no checkpoint; a randomly initialised tiny-qwen3-moe (Qwen3-MoE in vLLM) with
its experts split over the N ranks (EP = N, one vLLM worker per data-parallel replica), so the
refit gathers the expert-parallel shards under global expert indices."""


def _max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def _margin(model, completion, tp: int) -> float:
    """Smallest top-1 minus top-2 logit over the completion's positions (full forward)."""
    from kat_megatron.models.forward import forward_logits

    seq = completion.prompt_ids + completion.token_ids
    padded = seq + [0] * (-len(seq) % tp)
    logits = forward_logits([model], torch.tensor([padded]))[0, : len(seq)]
    n = len(completion.prompt_ids)
    top2 = logits.float()[n - 1 : len(seq) - 1].topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def _compare(kat_out, vllm_out, model, tp: int) -> dict:
    same = [a.token_ids == b.token_ids for a, b in zip(kat_out, vllm_out)]
    trainer = [W.recomputed_logprobs(model, c, tp).tolist() for c in vllm_out]
    return {
        "same_tokens": same,
        "lengths": [len(c.token_ids) for c in vllm_out],
        "max_vs_kat": max(
            (_max_diff(a.logprobs, b.logprobs) for a, b, s in zip(kat_out, vllm_out, same) if s),
            default=float("inf"),
        ),
        "kat_vs_trainer": max(
            _max_diff(c.logprobs, W.recomputed_logprobs(model, c, tp).tolist()) for c in kat_out
        ),
        "max_vs_trainer": max(_max_diff(c.logprobs, t) for c, t in zip(vllm_out, trainer)),
    }


def main(ckpt: str, prompts_file: str, out: str, rollout_tp: str = "1") -> None:
    import torch.distributed as dist

    from kat_megatron.config.schema import ParallelConfig
    from kat_megatron.data.tokenizer import load_tokenizer
    from kat_megatron.inference.engine import RolloutEngine
    from kat_megatron.inference.loading import read_checkpoint_config
    from kat_megatron.inference.types import SamplingParams
    from kat_megatron.models.builder import build_model, transformer_config
    from kat_megatron.parallel.init import initialize, shutdown
    from kat_megatron.rl.prompts import load_prompts, prompt_token_ids
    from kat_megatron.rl.rollout_config import RolloutConfig
    from kat_megatron.rl.vllm_engine import VllmRolloutEngine
    from kat_megatron.training.checkpointing import load_checkpoint

    world = int(os.environ["WORLD_SIZE"])
    if ckpt == MOE:  # a random MoE policy, experts over all ranks (DP = EP = N)
        from kat_megatron.config import load_config

        cfg = load_config(None, ["model.preset=tiny-qwen3-moe", "model.init_method_std=0.2"])
        tp, parallel = 1, ParallelConfig(ep=world)
    else:
        path, cfg = read_checkpoint_config(ckpt)
        tp, parallel = world, ParallelConfig(tp=world)
    initialize(parallel, 1234, cfg.model)
    tcfg = transformer_config(cfg.model, parallel, "fp32", calculate_per_token_loss=True)
    model = build_model(cfg.model, parallel, "fp32", config=tcfg)[0]
    if ckpt != MOE:
        load_checkpoint(path, [model])
    tok = load_tokenizer(cfg.data.tokenizer)
    records = load_prompts(prompts_file)[:6]
    prompts = [prompt_token_ids(tok, r.messages) for r in records]
    kat = RolloutEngine(model, tok, max_sequence_length=128, max_batch_size=8)
    start = time.perf_counter()
    rollout = RolloutConfig(engine="vllm", refit_bucket_mb=0.1, tp=int(rollout_tp))
    vllm = VllmRolloutEngine(model, tok, cfg.model, rollout, max_sequence_length=128,
                             params_dtype=torch.float32, seed=0,
                             log_dir=Path(out).parent)  # fmt: skip
    res: dict = {
        "tp": tp,
        "ep": parallel.ep,
        "rollout_tp": int(rollout_tp),
        "startup_s": time.perf_counter() - start,
    }
    greedy = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    kat_out, vllm_out = kat.generate(prompts, greedy), vllm.generate(prompts, greedy)
    res["initial"] = _compare(kat_out, vllm_out, model, tp)
    res["initial"]["min_margin"] = min(_margin(model, c, tp) for c in kat_out)
    res["first_refit"] = {k: vllm.stats[k] for k in ("refit_buckets", "refit_bytes")}
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=MAX_NEW)
    seeds = list(range(100, 100 + len(prompts)))
    s1 = vllm.generate(prompts, sampled, seeds=seeds)
    s2 = vllm.generate(prompts, sampled, seeds=seeds)
    trainer = [W.recomputed_logprobs(model, c, tp).tolist() for c in s1]
    res["sampled"] = {
        "reproducible": [a.token_ids == b.token_ids for a, b in zip(s1, s2)],
        "differs_from_greedy": sum(a.token_ids != b.token_ids for a, b in zip(s1, vllm_out)),
        "max_vs_trainer": max(_max_diff(c.logprobs, t) for c, t in zip(s1, trainer)),
    }

    torch.manual_seed(0)  # the same on every rank: replicated parameters stay replicated
    with torch.no_grad():  # an optimizer step's stand-in, in place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    kat_new = kat.generate(prompts, greedy)
    stale = vllm.generate([c.prompt_ids for c in kat_new], greedy)
    res["stale"] = {
        "same_tokens": [a.token_ids == b.token_ids for a, b in zip(kat_new, stale)],
        "max_vs_trainer": max(
            _max_diff(c.logprobs, W.recomputed_logprobs(model, c, tp).tolist()) for c in stale
        ),
    }
    start = time.perf_counter()
    vllm.refit()
    res["refit_s"] = time.perf_counter() - start
    res["refit"] = {k: vllm.stats[k] for k in ("refit_buckets", "refit_bytes")}
    res["after_refit"] = _compare(kat_new, vllm.generate(prompts, greedy), model, tp)
    res["after_refit"]["min_margin"] = min(_margin(model, c, tp) for c in kat_new)
    vllm.close()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(res, indent=1))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
