"""Core attention speed and memory on CPU, `model.attention=sdpa` against `unfused`, in one run:

    .venv/bin/python benchmarks/attention.py [--seqs 512 1024 2048] [--reps 5] [--threads 1]
    .venv/bin/python benchmarks/attention.py --what sft --seqs 1024 2048 4096 --reps 3
    .venv/bin/python benchmarks/attention.py --what rl --reps 5

`--what layer model` (the default), per sequence length s, one forward + backward at batch 1,
fp32:
  layer   the core attention alone, called as Megatron-Core's `SelfAttention` calls it (query
          [s, 1, 8, 64], key/value [s, 1, 2, 64]: 8 heads in 2 GQA groups, causal, no mask
          tensor): `SDPAttention` (kat_megatron/models/attention.py) vs Megatron-Core's
          `DotProductAttention`.
  model   tiny-dense (4 layers, hidden 64, 2 heads of 32) built by `build_model` with each
          `model.attention`, the same weights; the per-token loss summed.
`--what sft`: one SFT micro-batch (tiny-dense, one packed row of s positions holding documents
of 24..400 tokens, as `kat_megatron/data/packing.py` packs chat records, loss on every position
of a document) through stage sft's own collate (`training/batches.py`) and the summed masked
loss: `unfused+mask` (the block-causal [1, 1, s, s] mask into Megatron-Core's unfused attention,
stage sft's path before `data.packing`), `sdpa+mask` (the same mask into SDPA) and `sdpa+thd`
(`data.packing`: `PackedSeqParams`, one causal SDPA call per document, no mask tensor).
`--what rl`: one RL micro-batch of 8 rollouts of mixed length (4 think_off-like of 40..80
positions, 4 think_on-like of 300..500, from a 32-token prompt) through `rl/batching.py`'s
collate and `rl_loss` (the policy loss on the response tokens): rows right-padded to the
longest (`rl.packing=false`) vs one THD row (`rl.packing=true`), both SDPA. Ratios there are
against the first column.

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


def _tiny_models(names: list[str], attention: dict[str, str]) -> dict:
    """tiny-dense built once per name with `attention[name]`, all with the first's weights."""
    from kat_megatron.config.presets import get_preset
    from kat_megatron.config.schema import ModelConfig, ParallelConfig
    from kat_megatron.models.builder import build_model, transformer_config

    par = ParallelConfig()
    base = ModelConfig(**get_preset("tiny-dense"))
    models = {}
    for name in names:
        cfg = dataclasses.replace(base, attention=attention[name])
        tcfg = transformer_config(cfg, par, "fp32", calculate_per_token_loss=True)
        models[name] = build_model(cfg, par, "fp32", config=tcfg)[0]
        models[name].load_state_dict(models[names[0]].state_dict())
        for p in models[name].parameters():  # gradients exist before measuring (not counted)
            p.grad = torch.zeros_like(p)
    return models


def sft_steps(seq: int) -> tuple[dict, int]:
    """({impl: step}, seq) for one packed SFT row of `seq` positions (module docstring)."""
    import random

    from kat_megatron.data.packing import TokenizedExample, pack_examples
    from kat_megatron.data.sft_data import PackedSFTDataset
    from kat_megatron.losses.lm import masked_token_loss
    from kat_megatron.training.batches import collate

    rng = random.Random(seq)
    docs, used = [], 0
    while used < seq:
        n = min(rng.randint(24, 400), seq - used + 1)
        docs.append(TokenizedExample(tuple(rng.randrange(5, 250) for _ in range(n)), (True,) * n))
        used += n - 1
    row = pack_examples(docs, seq, pad_id=0).sequences[0]
    attention = {"unfused+mask": "unfused", "sdpa+mask": "sdpa", "sdpa+thd": "sdpa"}
    models = _tiny_models(list(attention), attention)
    steps = {}
    for name, model in models.items():
        batch = collate([PackedSFTDataset([row], thd=name.endswith("thd"))[0]])

        def step(model=model, batch=batch):
            model.zero_grad(set_to_none=False)
            out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                        labels=batch["labels"],
                        packed_seq_params=batch.get("packed_seq_params"))  # fmt: skip
            loss = masked_token_loss(out, batch["loss_mask"])[0]
            loss.backward()
            return loss.detach()

        steps[name] = step
    return steps, seq


def rl_steps(seq: int) -> tuple[dict, int]:
    """({impl: step}, real positions) for one mixed-length RL micro-batch (module docstring;
    `seq` unused)."""
    import random

    from kat_megatron.losses.policy import PolicyLossConfig
    from kat_megatron.rl.batching import RolloutSample, collate_rollouts
    from kat_megatron.rl.logprobs import _policy_logits, rl_loss

    rng = random.Random(0)
    samples = []
    for k in range(8):
        n = rng.randint(40, 80) if k % 2 else rng.randint(300, 500)
        samples.append(RolloutSample(
            prompt_ids=[rng.randrange(5, 250) for _ in range(32)],
            response_ids=[rng.randrange(5, 250) for _ in range(n)],
            advantages=[rng.uniform(-1, 1)] * n, rollout_logprobs=[-1.0] * n))  # fmt: skip
    cfg = PolicyLossConfig()
    models = _tiny_models(["padded", "packed"], {"padded": "sdpa", "packed": "sdpa"})
    steps = {}
    for name, model in models.items():
        batch = collate_rollouts(samples, 0, 16, packed=name == "packed")

        def step(model=model, batch=batch):
            model.zero_grad(set_to_none=False)
            loss = rl_loss(_policy_logits(model, batch), batch, cfg)[0]
            loss.backward()
            return loss.detach()

        steps[name] = step
    real = sum(s.num_positions for s in samples)
    padded = batch["valid"].numel()
    print(f"rl: {real} real positions in {padded} padded ({padded / real:.2f}x: the ceiling of "
          "the speed-up where cost is linear in positions)")  # fmt: skip
    return steps, real


def bench(steps: dict, reps: int) -> dict:
    """{impl: (median MiB, median s)} plus the outputs' max relative difference against the
    first impl (sdpa vs unfused for the default workloads)."""
    res = {name: ([], []) for name in steps}
    outs = {}
    for step in steps.values():
        step()  # warm-up
    for _ in range(reps):
        for name, step in steps.items():
            mib, sec, outs[name] = measure(step)
            res[name][0].append(mib)
            res[name][1].append(sec)
    names = list(outs)
    b = outs["unfused"] if "unfused" in outs else outs[names[0]]
    diff = max(((a - b).abs().max() / b.abs().max()).item() for a in outs.values())
    return {n: (statistics.median(m), statistics.median(s)) for n, (m, s) in res.items()}, diff


def compare(steps_of, seqs: list[int], reps: int) -> None:
    """Print tokens/s and peak MiB of every impl, and each against the first, per length
    (`steps_of(seq)` -> ({impl: step}, tokens per step))."""
    for seq in seqs:
        steps, n_tokens = steps_of(seq)
        res, diff = bench(steps, reps)
        names = list(res)
        m0, s0 = res[names[0]]
        cells = "  ".join(f"{n} {n_tokens / s:,.0f} tok/s {m:.1f} MiB ({s0 / s:.2f}x, "
                          f"{m / m0:.2f}x)" for n, (m, s) in res.items())  # fmt: skip
        print(f"{seq:>5}  {cells}  max rel diff {diff:.1e}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--what", nargs="+", default=["layer", "model"],
                   choices=["layer", "model", "sft", "rl"])  # fmt: skip
    args = p.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # see the module docstring
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(args.threads)

    from kat_megatron.config.schema import ParallelConfig
    from kat_megatron.parallel.init import initialize, shutdown

    initialize(ParallelConfig(), seed=0)
    t0 = time.perf_counter()
    if "sft" in args.what:
        print("sft: tokens/s and peak MiB (x = against unfused+mask), one packed row")
        compare(sft_steps, args.seqs, args.reps)
    if "rl" in args.what:
        print("rl: 8 mixed-length rollouts, real (unpadded) positions/s (x = against padded)")
        compare(rl_steps, [0], args.reps)
    args.seqs = args.seqs if {"layer", "model"} & set(args.what) else []
    if not args.seqs:
        print(f"({time.perf_counter() - t0:.0f} s)")
        shutdown()
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1; "
          f"layer: {HEADS} heads / {GROUPS} groups x {HEAD_DIM}, causal; model: tiny-dense")  # fmt: skip
    head = (f"{'what':6} {'seq':>5} {'unfused tok/s':>14} {'sdpa tok/s':>11} {'speed':>6} "
            f"{'unfused MiB':>12} {'sdpa MiB':>9} {'memory':>7} {'max rel diff':>13}")  # fmt: skip
    print(head)
    for seq in args.seqs:
        for what, build in (("layer", layer_steps), ("model", model_steps)):
            if what not in args.what:
                continue
            res, diff = bench(build(seq), args.reps)
            (mu, su), (ms, ss) = res["unfused"], res["sdpa"]
            print(f"{what:6} {seq:>5} {seq / su:>14,.0f} {seq / ss:>11,.0f} {su / ss:>5.2f}x "
                  f"{mu:>12.1f} {ms:>9.1f} {ms / mu:>6.2f}x {diff:>13.1e}", flush=True)  # fmt: skip
    print(f"speed = sdpa tokens/s / unfused; memory = sdpa peak / unfused peak "
          f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    shutdown()


if __name__ == "__main__":
    main()
