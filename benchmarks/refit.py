"""Seconds per in-memory refit of the vLLM rollout worker against model size:

    .venv/bin/python benchmarks/refit.py [--sizes 128x2,256x2,512x4,768x4] [--bucket-mb 256]
        [--repeats 3] [--warmup 1]

For each size HIDDENxLAYERS (heads 64 wide: hidden/64 heads, 2 query groups; ffn 4 x hidden;
vocabulary 512; fp32), one gloo rank, no torchrun: a randomly initialised `GPTModel` and a
`VllmRolloutEngine` (rl/vllm_engine.py; a vLLM worker in `.venv-vllm`, `make vllm`) with
`rl.rollout.refit_bucket_mb = --bucket-mb` (default that of `RolloutConfig`). The worker's
start-up and the first weight push (dummy weights replaced) are printed on their own; then
`--warmup` untimed refits (in trial runs the refit after the first push was several times slower
than the later ones) and `--repeats` timed `refit()` calls, each the whole push of stage rl
after an optimizer step: every parameter gathered into its HF name and packed into
shared-memory buckets, each loaded by the worker (`load_weights` through vLLM's layerwise reload)
before the next is packed, then the prefix cache reset. The worker is closed before the next
size starts. Printed per size: parameters, MB sent (`engine.stats["refit_bytes"]`, 1 MB = 1e6
bytes), buckets (`refit_buckets`), the median seconds per refit and MB/s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        hidden, _, layers = item.partition("x")
        if not hidden.isdigit() or not layers.isdigit() or int(hidden) % 64:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected HIDDENxLAYERS with HIDDEN a multiple of 64, e.g. 256x4"
            )
        sizes.append((int(hidden), int(layers)))
    return sizes


def _measure(hidden: int, layers: int, args: argparse.Namespace, log_dir: str) -> dict:
    from kat_megatron.config import load_config
    from kat_megatron.data.tokenizer import load_tokenizer
    from kat_megatron.models.builder import build_model
    from kat_megatron.parallel.init import initialize
    from kat_megatron.rl.rollout_config import RolloutConfig
    from kat_megatron.rl.vllm_engine import VllmRolloutEngine

    heads = hidden // 64
    cfg = load_config(
        None,
        [
            f"model.hidden_size={hidden}",
            f"model.ffn_hidden_size={4 * hidden}",
            f"model.num_layers={layers}",
            f"model.num_attention_heads={heads}",
            f"model.num_query_groups={2 if heads % 2 == 0 else 1}",
            "model.vocab_size=512",
        ],
    )
    initialize(cfg.parallel, seed=0, model=cfg.model)
    model = build_model(cfg.model, cfg.parallel, "fp32")[0]
    rollout = RolloutConfig(engine="vllm", refit_bucket_mb=args.bucket_mb)
    start = time.perf_counter()
    engine = VllmRolloutEngine(model, load_tokenizer("tiny"), cfg.model, rollout,
                               max_sequence_length=128, params_dtype=torch.float32,
                               log_dir=log_dir)  # fmt: skip
    try:
        startup = time.perf_counter() - start
        start = time.perf_counter()
        engine.refit()  # the first push
        first = time.perf_counter() - start
        for _ in range(args.warmup):  # the refit after the first push runs slower, too
            engine.refit()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine.refit()
            times.append(time.perf_counter() - start)
        stats = dict(engine.stats)
    finally:
        engine.close()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": stats["refit_bytes"],
        "buckets": stats["refit_buckets"],
        "startup": startup,
        "first": first,
        "median": statistics.median(times),
        "times": times,
    }


def main() -> None:
    from kat_megatron.rl.rollout_config import RolloutConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=_sizes, default=_sizes("128x2,256x2,512x4,768x4"),
                   help="comma-separated HIDDENxLAYERS")  # fmt: skip
    p.add_argument("--bucket-mb", type=float, default=RolloutConfig.refit_bucket_mb,
                   help="shared-memory bucket in MiB (rl.rollout.refit_bucket_mb)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed refits after the first push")
    args = p.parse_args()
    if args.repeats < 1 or args.warmup < 0 or not args.bucket_mb > 0:
        p.error("expected --repeats >= 1, --warmup >= 0 and --bucket-mb > 0")

    from kat_megatron.parallel.init import shutdown
    from kat_megatron.rl.rollout_config import check_vllm, resolve_vllm_python
    from kat_megatron.utils.logging import setup_logging

    try:
        check_vllm(resolve_vllm_python(None))
    except ValueError as err:
        raise SystemExit(f"benchmarks/refit.py needs vLLM: {err}") from None
    setup_logging("WARNING")
    log_dir = tempfile.mkdtemp(prefix="kat-bench-refit-")
    print(f"bucket {args.bucket_mb:g} MiB, fp32; per size one vLLM worker, the first push, "
          f"{args.warmup} untimed and {args.repeats} timed refits")  # fmt: skip
    head = f"{'size':>9} {'params':>11} {'MB':>8} {'buckets':>7} {'s/refit':>8} {'MB/s':>8}"
    rows = []
    try:
        for hidden, layers in args.sizes:
            r = _measure(hidden, layers, args, log_dir)
            each = ", ".join(f"{t:.3f}" for t in r["times"])
            print(f"{hidden}x{layers}: worker start-up {r['startup']:.1f} s, first push "
                  f"{r['first']:.3f} s (neither in the table); refits {each} s",
                  flush=True)  # fmt: skip
            rows.append((f"{hidden}x{layers}", r))
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
        shutdown()
    print(head)
    for size, r in rows:
        mb = r["bytes"] / 1e6
        print(f"{size:>9} {r['params']:>11,} {mb:>8.1f} {r['buckets']:>7} "
              f"{r['median']:>8.3f} {mb / r['median']:>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
