"""Core attention speed and memory on CPU, `model.attention=sdpa` against `unfused`, in one run:

    .venv/bin/python benchmarks/attention.py [--seqs 512 1024 2048] [--reps 5] [--threads 1]

Two workloads per sequence length s, each one forward + backward at batch 1, fp32:
  layer   the core attention alone, called as Megatron-Core's `SelfAttention` calls it (query
          [s, 1, 8, 64], key/value [s, 1, 2, 64]: 8 heads in 2 GQA groups, causal, no mask
          tensor): `SDPAttention` (kat_megatron/models/attention.py) vs Megatron-Core's
          `DotProductAttention`.
  model   tiny-dense (4 layers, hidden 64, 2 heads of 32) built by `build_model` with each
          `model.attention`, the same weights; the per-token loss summed.
Runs alternate between the two (one warm-up each) so machine noise hits both alike; each
figure is the median over --reps. Tokens/s = s / (forward + backward seconds). Outputs of the
two are checked to agree (max relative difference printed).

Memory method: peak resident set size during the measured forward + backward minus the
resident size just before it (inputs and weights already allocated), read from Linux's VmHWM
after resetting it (writing "5" to /proc/self/clear_refs). The script re-executes itself with
MALLOC_MMAP_THRESHOLD_=65536 so glibc serves tensor buffers from mmap and returns them on free:
RSS then follows live tensor bytes, kernel workspaces included (tracemalloc sees none of torch's
allocations). Megatron-Core's global memory buffer (where the unfused path keeps its scores) is
dropped before each measurement so that it is counted, as in a fresh run. Prints ratios against
the unfused baseline of the same run; absolute figures depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time

import torch

MB = 1024 * 1024
HEADS, GROUPS, HEAD_DIM = 8, 2, 64


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(step) -> tuple[float, float, torch.Tensor]:
    """(peak MiB added by `step()`, seconds, its output) for one call."""
    from megatron.core import parallel_state as ps

    ps.destroy_global_memory_buffer()
    ps._set_global_memory_buffer()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = step()
    seconds = time.perf_counter() - t0
    return (_status_kb("VmHWM") - base) / 1024, seconds, out


def layer_steps(seq: int) -> dict:
    """{impl: step} for the core attention alone."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from kat_megatron.models.attention import SDPAttention

    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM,
                               num_attention_heads=HEADS, num_query_groups=GROUPS,
                               kv_channels=HEAD_DIM, attention_dropout=0.0,
                               use_cpu_initialization=True)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, 1, HEADS, HEAD_DIM, generator=g)
    k, v = (torch.randn(seq, 1, GROUPS, HEAD_DIM, generator=g) for _ in range(2))
    grad = torch.randn(seq, 1, HEADS * HEAD_DIM, generator=g)
    steps = {}
    for name, cls in (("unfused", DotProductAttention), ("sdpa", SDPAttention)):
        module = cls(config, 1, AttnMaskType.causal, "self")

        def step(module=module):
            qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
            out = module(qq, kk, vv, None)
            out.backward(grad)
            return out.detach()

        steps[name] = step
    return steps


def model_steps(seq: int) -> dict:
    """{impl: step} for tiny-dense, forward + backward of the summed per-token loss."""
    from kat_megatron.config.presets import get_preset
    from kat_megatron.config.schema import ModelConfig, ParallelConfig
    from kat_megatron.models.builder import build_model, transformer_config

    par = ParallelConfig()
    base = ModelConfig(**get_preset("tiny-dense"))
    tokens = torch.randint(5, base.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(seq)[None]
    models = {}
    for name in ("unfused", "sdpa"):
        cfg = dataclasses.replace(base, attention=name)
        tcfg = transformer_config(cfg, par, "fp32", calculate_per_token_loss=True)
        models[name] = build_model(cfg, par, "fp32", config=tcfg)[0]
    models["sdpa"].load_state_dict(models["unfused"].state_dict())
    steps = {}
    for name, model in models.items():

        def step(model=model):
            model.zero_grad(set_to_none=False)
            loss = model(tokens, pos, None, labels=tokens).sum()
            loss.backward()
            return loss.detach()

        for p in model.parameters():  # gradients exist before measuring (not counted)
            p.grad = torch.zeros_like(p)
        steps[name] = step
    return steps


def bench(steps: dict, reps: int) -> dict:
    """{impl: (median MiB, median s)} plus the outputs' max relative difference."""
    res = {name: ([], []) for name in steps}
    outs = {}
    for step in steps.values():
        step()  # warm-up
    for _ in range(reps):
        for name, step in steps.items():
            mib, sec, outs[name] = measure(step)
            res[name][0].append(mib)
            res[name][1].append(sec)
    a, b = outs["sdpa"], outs["unfused"]
    diff = ((a - b).abs().max() / b.abs().max()).item()
    return {n: (statistics.median(m), statistics.median(s)) for n, (m, s) in res.items()}, diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # see the module docstring
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(args.threads)

    from kat_megatron.config.schema import ParallelConfig
    from kat_megatron.parallel.init import initialize, shutdown

    initialize(ParallelConfig(), seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1; "
          f"layer: {HEADS} heads / {GROUPS} groups x {HEAD_DIM}, causal; model: tiny-dense")  # fmt: skip
    head = (f"{'what':6} {'seq':>5} {'unfused tok/s':>14} {'sdpa tok/s':>11} {'speed':>6} "
            f"{'unfused MiB':>12} {'sdpa MiB':>9} {'memory':>7} {'max rel diff':>13}")  # fmt: skip
    print(head)
    t0 = time.perf_counter()
    for seq in args.seqs:
        for what, build in (("layer", layer_steps), ("model", model_steps)):
            res, diff = bench(build(seq), args.reps)
            (mu, su), (ms, ss) = res["unfused"], res["sdpa"]
            print(f"{what:6} {seq:>5} {seq / su:>14,.0f} {seq / ss:>11,.0f} {su / ss:>5.2f}x "
                  f"{mu:>12.1f} {ms:>9.1f} {ms / mu:>6.2f}x {diff:>13.1e}", flush=True)  # fmt: skip
    print(f"speed = sdpa tokens/s / unfused; memory = sdpa peak / unfused peak "
          f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    shutdown()


if __name__ == "__main__":
    main()
