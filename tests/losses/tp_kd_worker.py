"""TP worker for tests/losses/test_vocab_parallel.py (real gloo ranks, vocabulary sharded):

    python -m torch.distributed.run --nproc-per-node 2 tests/losses/tp_kd_worker.py OUT_DIR

Every rank builds the same seeded full-vocabulary inputs, keeps its vocabulary shard, runs each
case with the TP group passed explicitly and saves values and its shard's gradients to
OUT_DIR/rank{R}.pt; rank 0 also saves the full inputs to OUT_DIR/inputs.pt for the references.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kat_megatron.losses.kd import KDConfig, TeacherLogits, documents_from_eod, mtp_kd_loss
from kat_megatron.losses.vocab_parallel import vocab_parallel_ce_kl, vocab_parallel_topk

N, V, K = 10, 96, 5
S, B, D = 12, 2, 2
PAD = 7  # padded columns at the end of the last shard in the padded-vocabulary case


def make_inputs() -> dict[str, torch.Tensor]:
    """Seeded full-vocabulary inputs shared by the worker and the test's references."""
    g = torch.Generator().manual_seed(1234)
    return {
        "z": torch.randn(N, V, generator=g),
        "u": torch.randn(N, V, generator=g),
        "labels": torch.randint(0, V - PAD, (N,), generator=g),
        "g_ce": torch.rand(N, generator=g),
        "g_kl": torch.rand(N, generator=g),
        "heads": torch.randn(D + 1, S, B, V, generator=g),
        "teacher": torch.randn(S, B, V, generator=g),
        "tokens": torch.randint(1, V, (B, S + 1), generator=g),
    }


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world, dim=-1)[rank].contiguous()


def _ce_kl(z, labels, g_ce, g_kl, **kw):
    z = z.clone().requires_grad_()
    ce, kl, s_top1, t_top1 = vocab_parallel_ce_kl(z, labels, **kw)
    (ce * g_ce + kl * g_kl).sum().backward()
    return {"ce": ce, "kl": kl, "s_top1": s_top1, "t_top1": t_top1, "grad": z.grad}


def run_cases(rank: int, world: int, group) -> dict[str, dict]:
    x = make_inputs()
    z, u = _shard(x["z"], rank, world), _shard(x["u"], rank, world)
    common = {"labels": x["labels"], "g_ce": x["g_ce"], "g_kl": x["g_kl"], "group": group}
    out = {}
    for tau in (1.0, 2.0):
        for rev in (False, True):
            out[f"full_t{tau}_r{rev}"] = _ce_kl(
                z, temperature=tau, teacher_logits_nv=u, reverse=rev, **common
            )
            topk = vocab_parallel_topk(u, K, tau, group=group)
            case = _ce_kl(z, temperature=tau, teacher_topk=topk, reverse=rev, **common)
            out[f"topk_t{tau}_r{rev}"] = {**case, "topk": topk}
    topk_all = vocab_parallel_topk(u, V, 2.0, group=group)  # K = V: wider than a shard
    out["topk_eq_v"] = {
        **_ce_kl(z, temperature=2.0, teacher_topk=topk_all, reverse=True, **common),
        "topk": topk_all,
    }
    out["padded"] = _ce_kl(z, temperature=2.0, teacher_logits_nv=u, vocab_size=V - PAD, **common)
    out["mtp"] = run_mtp(x, rank, world, group)
    return out


def run_mtp(x, rank: int, world: int, group) -> dict[str, torch.Tensor]:
    """mtp_kd_loss with D = 2 heads, packed documents and a padded tail."""
    heads = [_shard(h, rank, world).requires_grad_() for h in x["heads"]]
    tokens = x["tokens"][:, :-1]
    loss_mask = torch.ones(B, S)
    loss_mask[1, -3:] = 0
    cfg = KDConfig(alpha=0.3, temperature=2.0, mtp_loss_scaling_factor=0.6)
    teacher = TeacherLogits(_shard(x["teacher"], rank, world))
    docs = documents_from_eod(tokens, eod_id=int(tokens[0, 4]))
    loss, count, metrics = mtp_kd_loss(
        heads, x["tokens"][:, 1:], loss_mask, teacher, cfg, documents=docs, group=group
    )
    loss.backward()
    return {"loss": loss, "count": count, "metrics": metrics, "grads": [h.grad for h in heads]}


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    results = run_cases(rank, world, group)
    torch.save(results, out_dir / f"rank{rank}.pt")
    if rank == 0:
        torch.save(make_inputs(), out_dir / "inputs.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
