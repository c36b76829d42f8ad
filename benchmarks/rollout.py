"""Rollout throughput: kat's KV-cached engine against full recomputation, or against vLLM:

    .venv/bin/python benchmarks/rollout.py [--batch 8] [--prompt 64] [--new 64] [--hidden 256]
    .venv/bin/python benchmarks/rollout.py --engines megatron,vllm --batch 8,32 --hidden 256 \
        --layers 4 [--short 24] [--repeats 3] [--warmup 2]

All engines run on the same randomly initialised model (heads 64 wide by default: hidden/64
heads, 2 query groups; vLLM's CPU attention refuses 16-wide heads; `model.init_method_std=0.2`
for sharper logits, fewer near-ties) and the same random prompts, greedily, in one process (one
gloo rank, no torchrun). `--engines` names one or more of:
- `cache` or `megatron`: `RolloutEngine.generate` (Megatron-Core's static inference context, one
  prefill pass, then one token per sequence per pass), the colocated engine of `rl.rollout`;
- `recompute`: a baseline that feeds the whole prefix through the same `GPTModel` for every new
  token (no inference context, the logits of the last position);
- `vllm`: `VllmRolloutEngine` (rl/vllm_engine.py), a vLLM worker process in `.venv-vllm`
  (`make vllm`) loaded with the model's weights by the in-memory refit. Its start-up and first
  weight push are printed on their own and not timed with the generation. Without a vLLM Python
  (`check_vllm`) one line says so and the other engines run alone.
Cases: `--new` new tokens per row at each `--batch`, and, when vLLM is among the engines (or
with `--short N` > 0), an AutoThink-like mixed batch at the largest batch: even rows stop after
`--short` tokens (think_off-like), odd rows run `--new` (think_on-like), by per-row
`SamplingParams.max_new_tokens`, exact and the same for every engine (no stop tokens; vLLM runs
with ignore_eos). Per case, after `--warmup` untimed calls of each engine, runs alternate
between the engines (`--repeats` rounds) so machine noise hits them alike. Printed per case:
generated tokens per second of each engine (the tokens it returned / the median wall time of a
call), the ratio of every engine to the reference (`recompute` when named, else the first
engine: `cache / recompute`, `vllm / megatron`), and the rows whose greedy tokens equal the
reference's token for token (reported, not enforced: a random model has near-ties that
different kernels may break differently).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

LABELS = {
    "cache": "KV cache (RolloutEngine)",
    "megatron": "megatron (RolloutEngine)",
    "recompute": "full recomputation per token",
    "vllm": "vLLM (VllmRolloutEngine)",
}
Generate = Callable[[list[list[int]], list], list[list[int]]]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="cache,recompute",
                   help="comma-separated: cache|megatron, recompute, vllm")  # fmt: skip
    p.add_argument("--batch", type=_ints, default=[8], help="batch sizes, e.g. 8,32")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    p.add_argument("--new", type=int, default=64, help="generated tokens per sequence")
    p.add_argument("--short", type=int, default=None,
                   help="tokens of the early-stopping rows of the AutoThink case; 0: no such "
                        "case; default 24 with vllm among the engines, else 0")  # fmt: skip
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=None, help="default: hidden / 64")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per engine and case")
    args = p.parse_args()
    args.engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in args.engines if e not in LABELS]
    if unknown or len(set(args.engines)) != len(args.engines) or not args.engines:
        p.error(f"--engines: expected distinct names out of {list(LABELS)}, got {args.engines}")
    if {"cache", "megatron"} <= set(args.engines):
        p.error("--engines: cache and megatron are the same engine; name it once")
    args.heads = args.heads or max(1, args.hidden // 64)
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden}: not a multiple of --heads {args.heads}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("expected --repeats >= 1 and --warmup >= 0")
    if args.short is None:
        args.short = 24 if "vllm" in args.engines else 0
    if args.short and not 0 < args.short < args.new:
        p.error(f"--short {args.short}: expected 0, or 1 to --new - 1 tokens")
    return args


def _vllm_engine(model, tokenizer, cfg, max_len: int, log_dir: str):
    """A started `VllmRolloutEngine` holding the model's weights, or None (one line printed)
    when there is no vLLM Python."""
    from kat_megatron.rl.rollout_config import RolloutConfig, check_vllm, resolve_vllm_python
    from kat_megatron.rl.vllm_engine import VllmRolloutEngine

    try:
        check_vllm(resolve_vllm_python(None))
    except ValueError as err:
        print(f"vLLM not available, running without it: {err}")
        return None
    start = time.perf_counter()
    engine = VllmRolloutEngine(model, tokenizer, cfg.model, RolloutConfig(engine="vllm"),
                               max_sequence_length=max_len, params_dtype=torch.float32,
                               log_dir=log_dir)  # fmt: skip
    up = time.perf_counter() - start
    start = time.perf_counter()
    engine.refit()  # the first weight push (else inside the first generate)
    push = time.perf_counter() - start
    mb = engine.stats["refit_bytes"] / 2**20
    print(f"vLLM worker start-up {up:.1f} s, first weight push {push:.2f} s "
          f"({mb:.1f} MiB); neither counted below")  # fmt: skip
    return engine


def _engines(args, model, tokenizer, cfg, log_dir: str, started: list) -> dict[str, Generate]:
    """One generate function per available engine; started vLLM engines go into `started`."""
    from kat_megatron.inference.engine import RolloutEngine

    fns: dict[str, Generate] = {}
    for name in args.engines:
        if name in ("cache", "megatron"):
            rollout = RolloutEngine(model, tokenizer, max_sequence_length=args.prompt + args.new,
                                    max_batch_size=max(args.batch))  # fmt: skip
            fns[name] = lambda prompts, rows, e=rollout: [
                c.token_ids for c in e.generate(prompts, rows)
            ]
        elif name == "recompute":
            fns[name] = lambda prompts, rows: _recomputed(model, prompts, rows)
        else:
            vllm = _vllm_engine(model, tokenizer, cfg, args.prompt + args.new, log_dir)
            if vllm is not None:
                fns[name] = lambda prompts, rows, e=vllm: [
                    c.token_ids for c in e.generate(prompts, rows)
                ]
                started.append(vllm)
    return fns


@torch.no_grad()
def _recomputed(model, prompts: list[list[int]], rows: list) -> list[list[int]]:
    """Greedy tokens from a full forward per new token (every row up to the longest row's
    `max_new_tokens`, then each row cut to its own: a plain static batch)."""
    model.eval()
    seq = torch.tensor(prompts)
    n = seq.shape[1]
    for _ in range(max(r.max_new_tokens for r in rows)):
        pos = torch.arange(seq.shape[1]).expand_as(seq)
        logits = model(seq, pos, None)[:, -1, :]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return [ids[n : n + r.max_new_tokens] for ids, r in zip(seq.tolist(), rows)]


def _cases(args) -> list[tuple[str, list[list[int]], list]]:
    from kat_megatron.inference.types import SamplingParams

    g = torch.Generator().manual_seed(0)
    long = SamplingParams(temperature=0, max_new_tokens=args.new)
    cases = []
    for b in args.batch:
        prompts = torch.randint(0, 512, (b, args.prompt), generator=g).tolist()
        cases.append((f"batch {b}, {args.new} new tokens each", prompts, [long] * b))
    if args.short:
        b = max(args.batch)
        short = SamplingParams(temperature=0, max_new_tokens=args.short)
        prompts = torch.randint(0, 512, (b, args.prompt), generator=g).tolist()
        rows = [short if i % 2 == 0 else long for i in range(b)]
        label = (f"AutoThink batch {b}: {b - b // 2} rows of {args.short} new tokens "
                 f"(think_off-like), {b // 2} of {args.new} (think_on-like)")  # fmt: skip
        cases.append((label, prompts, rows))
    return cases


def _run_case(fns: dict[str, Generate], prompts, rows, repeats: int, warmup: int) -> None:
    for fn in fns.values():
        for _ in range(warmup):  # the first calls of a shape run slower (one is not enough)
            fn(prompts, rows)
    times: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outputs[name] = fn(prompts, rows)
            times[name].append(time.perf_counter() - t0)
    rate = {n: sum(map(len, outputs[n])) / statistics.median(t) for n, t in times.items()}
    width = max(len(LABELS[n]) for n in fns) + 1
    for name in fns:
        tokens = sum(map(len, outputs[name]))
        print(f"  {LABELS[name] + ':':{width}} {rate[name]:9.1f} generated tokens/s (median; "
              f"{tokens} tokens in {statistics.median(times[name]):.3f} s)")  # fmt: skip
    first = "recompute" if "recompute" in fns else next(iter(fns))  # the reference
    others = [n for n in fns if n != first]
    for name in others:
        same = sum(a == b for a, b in zip(outputs[first], outputs[name]))
        print(f"  identical greedy tokens {name} vs {first}: {same}/{len(rows)} rows "
              f"({same / len(rows):.0%})")  # fmt: skip
    for name in others:
        print(f"  ratio {name} / {first}: {rate[name] / rate[first]:.2f}")


def main() -> None:
    args = _parse()
    from kat_megatron.config import load_config
    from kat_megatron.data.tokenizer import load_tokenizer
    from kat_megatron.models.builder import build_model
    from kat_megatron.parallel.init import initialize, shutdown
    from kat_megatron.utils.logging import setup_logging

    setup_logging("WARNING")
    h, heads = args.hidden, args.heads
    cfg = load_config(
        None,
        [
            f"model.hidden_size={h}",
            f"model.ffn_hidden_size={4 * h}",
            f"model.num_layers={args.layers}",
            f"model.num_attention_heads={heads}",
            f"model.num_query_groups={2 if heads % 2 == 0 else 1}",
            "model.vocab_size=512",
            "model.init_method_std=0.2",  # sharper logits: fewer near-ties in the greedy check
        ],
    )
    initialize(cfg.parallel, seed=0, model=cfg.model)
    model = build_model(cfg.model, cfg.parallel, "fp32")[0]
    log_dir = tempfile.mkdtemp(prefix="kat-bench-rollout-")
    started: list = []
    try:
        fns = _engines(args, model, load_tokenizer("tiny"), cfg, log_dir, started)
        if not fns:
            raise SystemExit("no engine left to run")
        print(f"model: {args.layers} layers, hidden {h} ({heads} heads of {h // heads}); prompt "
              f"{args.prompt}; greedy; {args.repeats} timed runs "
              f"each after {args.warmup} warm-up")  # fmt: skip
        for label, prompts, rows in _cases(args):
            print(label)
            _run_case(fns, prompts, rows, args.repeats, args.warmup)
    finally:
        for engine in started:
            engine.close()
        shutil.rmtree(log_dir, ignore_errors=True)
        shutdown()


if __name__ == "__main__":
    main()
