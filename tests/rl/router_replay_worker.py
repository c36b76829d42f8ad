"""MoE router replay on real gloo ranks (tests/rl/test_router_replay.py):

    python -m torch.distributed.run --nproc-per-node N tests/rl/router_replay_worker.py OUT.json

A random tiny-qwen3-moe (8 experts, top-2; EP = N) built as stage rl builds it with
`rl.router_replay` (`moe_enable_routing_replay=True`), the colocated `RolloutEngine` with an
`EngineRecorder`, greedy completions of prompts of different lengths (prefill windows and decode
steps both recorded). Rank 0 writes:
- `recorded_vs_full`: per completion, whether the engine's recorded experts (as sets per
  position and layer) equal those of one full forward over the same tokens with Megatron-Core's
  RECORD action (an independent pass: no KV cache, one window);
- log-probs of the response tokens from `forward_logprobs` on micro-batches collated with the
  recorded routing (padded and packed), without routing, and with every expert index shifted
  by one (mod 8): replay must equal free routing where the choices agree, and the shifted
  routing must change the result (the replay is really applied);
- the engine's own log-probs against the replayed trainer's (the mismatch metric's value).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

PROMPTS = [[5, 17, 33, 101, 7], [9, 250, 3, 9, 44, 61, 12, 8, 130], [300, 2, 77]]
MAX_NEW = 10


def _full_routing(model, seq: list[int]) -> torch.Tensor:
    """`[L, n, k]` experts of one full forward over seq[:-1] (RECORD)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from kat_megatron.models.forward import forward_logits

    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    try:
        forward_logits([model], torch.tensor([seq[:-1]]))
        return torch.stack(RouterReplay.get_recorded_data())
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()


def main(out: str) -> None:
    import torch.distributed as dist

    from kat_megatron.config import load_config
    from kat_megatron.config.schema import ParallelConfig
    from kat_megatron.data.tokenizer import load_tokenizer
    from kat_megatron.inference.engine import RolloutEngine
    from kat_megatron.inference.types import SamplingParams
    from kat_megatron.models.builder import build_model, transformer_config
    from kat_megatron.parallel.init import initialize, shutdown
    from kat_megatron.rl import router_replay
    from kat_megatron.rl.batching import RolloutSample, microbatches, response_values
    from kat_megatron.rl.logprobs import forward_logprobs

    ep = int(os.environ["WORLD_SIZE"])
    cfg = load_config(None, ["model.preset=tiny-qwen3-moe", "model.init_method_std=0.2"])
    parallel = ParallelConfig(ep=ep)
    initialize(parallel, 1234, cfg.model)
    tcfg = transformer_config(cfg.model, parallel, "fp32", calculate_per_token_loss=True,
                              **router_replay.transformer_overrides())  # fmt: skip
    model = build_model(cfg.model, parallel, "fp32", config=tcfg)[0]
    n_experts = cfg.model.num_moe_experts
    engine = RolloutEngine(model, load_tokenizer("tiny"), max_sequence_length=64,
                           routing_recorder=router_replay.EngineRecorder())  # fmt: skip
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW))
    res: dict = {"ep": ep, "layers": router_replay.num_layers()}
    res["routing_shapes"] = [list(c.routing.shape) for c in outs]
    res["positions"] = [len(c.prompt_ids) + len(c.token_ids) - 1 for c in outs]
    agree = []
    for c in outs:
        full = _full_routing(model, c.prompt_ids + c.token_ids)
        agree.append(bool(torch.equal(full.sort(-1).values, c.routing.long().sort(-1).values)))
    res["recorded_vs_full"] = agree

    def logps(routing_of, packed: bool) -> list[list[float]]:
        samples = [
            RolloutSample(
                c.prompt_ids,
                c.token_ids,
                [0.0] * len(c.token_ids),
                c.logprobs,
                routing=routing_of(c),
            )  # fmt: skip
            for c in outs
        ]
        batches = microbatches(samples, len(samples), 1, 0, 16, packed=packed)
        (logp_bs,) = forward_logprobs([model], batches)
        return response_values(logp_bs, samples)

    def diff(a, b) -> float:
        return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))

    replay = logps(lambda c: c.routing, packed=False)
    res["replay_vs_free"] = diff(replay, logps(lambda c: None, packed=False))
    res["replay_packed_vs_padded"] = diff(replay, logps(lambda c: c.routing, packed=True))
    res["shifted_vs_replay"] = diff(
        replay, logps(lambda c: (c.routing + 1) % n_experts, packed=False)
    )
    res["engine_vs_replay"] = diff(replay, [c.logprobs for c in outs])
    res["replay_after"] = router_replay.num_layers()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(res, indent=1))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
