"""Rollout throughput with the KV cache against full recomputation of the prefix per token:

    .venv/bin/python benchmarks/rollout.py [--batch 8] [--prompt 64] [--new 64] [--hidden 256]

Both run in this process on the same randomly initialised model and the same batch of random
prompts, greedily (so both must produce the same tokens, which is checked): the engine
(`RolloutEngine.generate`: Megatron-Core's static inference context, one prefill pass, then one
token per sequence per pass) and a baseline that feeds the whole prefix through the same
`GPTModel` for every new token (no inference context, the logits of the last position). Runs
alternate between the two (warm-up first) so machine noise hits both alike. Prints generated
tokens per second of each (median over repeats) and the ratio cached / recomputed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    p.add_argument("--new", type=int, default=64, help="generated tokens per sequence")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from kat_megatron.config import load_config
    from kat_megatron.data.tokenizer import load_tokenizer
    from kat_megatron.inference.engine import RolloutEngine
    from kat_megatron.inference.types import SamplingParams
    from kat_megatron.models.builder import build_model
    from kat_megatron.parallel.init import initialize
    from kat_megatron.utils.logging import setup_logging

    setup_logging("WARNING")
    h = args.hidden
    cfg = load_config(
        None,
        [
            f"model.hidden_size={h}",
            f"model.ffn_hidden_size={4 * h}",
            f"model.num_layers={args.layers}",
            "model.num_attention_heads=8",
            "model.num_query_groups=2",
            "model.vocab_size=512",
            "model.init_method_std=0.2",  # sharper logits: fewer near-ties in the greedy check
        ],
    )
    initialize(cfg.parallel, seed=0, model=cfg.model)
    model = build_model(cfg.model, cfg.parallel, "fp32")[0]
    engine = RolloutEngine(
        model,
        load_tokenizer("tiny"),
        max_sequence_length=args.prompt + args.new,
        max_batch_size=args.batch,
    )
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 512, (args.batch, args.prompt), generator=g)
    params = SamplingParams(temperature=0, max_new_tokens=args.new)

    def cached() -> list[list[int]]:
        return [c.token_ids for c in engine.generate(prompts.tolist(), params)]

    @torch.no_grad()
    def recomputed() -> list[list[int]]:
        model.eval()
        seq = prompts.clone()
        for _ in range(args.new):
            pos = torch.arange(seq.shape[1]).expand_as(seq)
            logits = model(seq, pos, None)[:, -1, :]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        return seq[:, args.prompt :].tolist()

    cached(), recomputed()  # warm-up
    times: dict[str, list[float]] = {"cached": [], "recomputed": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in (("cached", cached), ("recomputed", recomputed)):
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.new
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    same = outputs["cached"] == outputs["recomputed"]
    print(f"model: {args.layers} layers, hidden {h}; batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} new tokens each; {args.repeats} timed runs each")  # fmt: skip
    print(f"KV cache (RolloutEngine):     {rate['cached']:9.1f} generated tokens/s (median)")
    print(f"full recomputation per token: {rate['recomputed']:9.1f} generated tokens/s (median)")
    print(f"identical greedy tokens: {same}")
    print(f"ratio cached / recomputed: {rate['cached'] / rate['recomputed']:.2f}")


if __name__ == "__main__":
    main()
