"""Peak memory and time of the vocab-parallel KD loss against a gathered implementation, at TP=2:

    .venv/bin/python benchmarks/kd_loss.py [--tokens 512] [--vocab 152064] [--tp 2] [--reps 3]

Re-launches itself on `--tp` local gloo ranks (torch.distributed.run). Every rank holds student
and teacher logits `[tokens, vocab / tp]` (fp32, as the output layer of a TP model would) and
runs forward + backward of `sum_t (1 - alpha) CE + alpha tau^2 KL(q || p)` (alpha 0.5, tau 2)
two ways:
  vocab-parallel  `kat_megatron.losses.vocab_parallel.vocab_parallel_ce_kl` on the shards;
  gathered        all-gather both logits to `[tokens, vocab]` (the student's gather is
                  differentiable: backward keeps the rank's own slice), then plain torch
                  `log_softmax`/`cross_entropy` on the full vocabulary (the naive baseline).
Both produce the student's gradient shard; the script checks that they agree.

Memory method: peak resident set size of the rank's process during one forward + backward,
minus its resident size just before (inputs already allocated, so only what the loss adds is
counted, the gradient included). The peak is Linux's VmHWM, reset before each measurement by
writing "5" to /proc/self/clear_refs. The ranks run with MALLOC_MMAP_THRESHOLD_=65536, so
glibc serves every tensor buffer from mmap and unmaps it on free: RSS follows live tensor bytes
(tracemalloc would not see torch's allocations at all). Each rank measures itself; the median over --reps alternating runs, maximum over
ranks, is printed. Time: the same median/maximum of forward + backward wall time. Prints both ratios (goal: memory
<= 0.6x of gathered).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time

import torch

from kat_megatron.utils.io import free_port

MB = 1024 * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(step) -> tuple[float, float]:
    """(peak MiB added by `step()`, seconds) for one call."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return (_status_kb("VmHWM") - base) / 1024, seconds


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the vocabulary; backward keeps this rank's slice (the loss is replicated
    on every rank, as Megatron's `gather_from_tensor_model_parallel_region`)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.rank, ctx.width, ctx.group = dist.get_rank(group), x.shape[-1], group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width].contiguous(), None


def gathered_loss(z, u, labels, alpha, tau, group):
    """The naive baseline: gather the full vocabulary, then standard torch ops."""
    zf = _GatherLastDim.apply(z, group)
    uf = _GatherLastDim.apply(u.detach(), group)
    lp = torch.log_softmax(zf / tau, dim=-1)
    lq = torch.log_softmax(uf / tau, dim=-1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    ce = torch.nn.functional.cross_entropy(zf, labels, reduction="none")
    return ((1 - alpha) * ce + alpha * tau**2 * kl).sum()


def parallel_loss(z, u, labels, alpha, tau, group):
    from kat_megatron.losses.vocab_parallel import vocab_parallel_ce_kl

    ce, kl, _, _ = vocab_parallel_ce_kl(z, labels, tau, teacher_logits_nv=u, group=group)
    return ((1 - alpha) * ce + alpha * tau**2 * kl).sum()


def rank_main(args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    g = torch.Generator().manual_seed(0)
    shard = args.vocab // world
    z_full = torch.randn(args.tokens, args.vocab, generator=g)
    u_full = torch.randn(args.tokens, args.vocab, generator=g) * 2
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    z = z_full[:, rank * shard : (rank + 1) * shard].clone().requires_grad_()
    u = u_full[:, rank * shard : (rank + 1) * shard].clone()
    del z_full, u_full
    results, grads = {"parallel": [], "gathered": []}, {}
    fns = {"parallel": parallel_loss, "gathered": gathered_loss}
    for _ in range(args.reps):
        for name, fn in fns.items():
            z.grad = None

            def step(fn=fn):
                fn(z, u, labels, 0.5, 2.0, group).backward()

            dist.barrier()
            results[name].append(measure(step))
            grads[name] = z.grad
            z.grad = None
    err = (grads["parallel"] - grads["gathered"]).abs().max()
    med = [[statistics.median(r[i] for r in results[n]) for n in fns] for i in (0, 1)]
    peaks, times = torch.tensor(med, dtype=torch.float64)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    if rank == 0:
        shard_mb = args.tokens * shard * 4 / MB
        print(f"TP={world} tokens={args.tokens} vocab={args.vocab} fp32; one logits shard "
              f"[{args.tokens}, {shard}] = {shard_mb:.0f} MiB; max |grad diff| = {err:.2e}")  # fmt: skip
        for i, name in enumerate(fns):
            print(f"  {name:9s} peak +{peaks[i]:7.0f} MiB per rank ({peaks[i] / shard_mb:4.1f} "
                  f"shards)  time {times[i] * 1000:7.1f} ms")  # fmt: skip
        print(f"ratio parallel / gathered: memory {peaks[0] / peaks[1]:.2f}x (goal <= 0.6x), "
              f"time {times[0] / times[1]:.2f}x")  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.vocab % args.tp:
        p.error("--vocab must be divisible by --tp")
    if "RANK" in os.environ:
        return rank_main(args)
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.tp),
           "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, *sys.argv[1:]]  # fmt: skip
    # Every allocation >= 64 KiB from mmap, returned on free: RSS follows live tensors.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
