"""Vocab-parallel cross-entropy + KL and teacher top-K, with the vocabulary sharded over TP ranks.

Usage:
    ce_n, kl_n, top1_n, teacher_top1_n = vocab_parallel_ce_kl(
        student_nv, labels_n, temperature=2.0, teacher_logits_nv=teacher_nv, group=tp_group)
    ids_nk, logprobs_nk, residual_n = vocab_parallel_topk(teacher_nv, k=64, group=tp_group)

Layout: logits are `[n, V/tp]`, n tokens (flatten Megatron's `[s, b, V/tp]` first) by this rank's
contiguous vocabulary shard, as Megatron-Core's `ColumnParallelLinear` output layer lays it out:
rank r holds global ids `[r * V/tp, (r + 1) * V/tp)`. `group` is the TP process group (`None` is
one rank); every per-token result is replicated on all ranks of the group. `vocab_size` (the
tokenizer's, <= tp * V/tp) drops the padded columns of the last shard(s) from every softmax.

Method (after `megatron/core/tensor_parallel/cross_entropy.py`): an all-reduce MAX of the shard
maxima, one all-reduce SUM of the per-shard partial sums (sums of exp, the label's logit, the
student's logits at the teacher's top-K ids gathered where they fall in the shard, the residual
mass outside the top-K), a second SUM of the KL partials in the full-teacher case, and a MIN for
argmax ties. The full vocabulary is never gathered. A custom autograd.Function saves only the
inputs and per-token statistics and recomputes the softmax in backward; backward needs no
collective. Everything is computed in fp32 (fp64 for fp64 logits) whatever the logits' dtype.

KL over buckets: with a top-K teacher, both distributions (at temperature tau) are coarsened to
K + 1 buckets, the K teacher ids and one bucket for the rest of the vocabulary; with full teacher
logits every token is its own bucket. With j(v) the bucket of token v, p = softmax(z / tau):
    forward  KL(q || p):  dKL/dz_v = p_v * (1 - q_j(v) / P_j(v)) / tau
    reverse  KL(p || q):  dKL/dz_v = p_v * (log P_j(v) - log q_j(v) - KL) / tau
"""

from __future__ import annotations

from typing import Any

import torch

_BIG = torch.iinfo(torch.int64).max


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 logits (exactness tests), else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _world(group: Any) -> tuple[int, int]:
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_(tensor: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    """In-place all-reduce (`op` in sum/max/min) over `group`; identity for one rank."""
    if _world(group)[1] == 1:
        return tensor
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(tensor, op=ops[op], group=group)
    return tensor


def _all_gather_cat(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    rank, world = _world(group)
    if world == 1:
        return tensor
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def shard_bounds(shard_size: int, vocab_size: int | None, group: Any) -> tuple[int, int]:
    """`(start, real)`: this rank's first global id and its number of non-padding columns."""
    rank, world = _world(group)
    total = shard_size * world
    vocab = total if vocab_size is None else vocab_size
    if not (world - 1) * shard_size < vocab <= total:
        raise ValueError(
            f"vocab_size={vocab} must be in ({(world - 1) * shard_size}, {total}] for "
            f"{world} shards of {shard_size} columns (every shard needs a real column)"
        )
    start = rank * shard_size
    return start, min(shard_size, vocab - start)


def _local_index(ids: torch.Tensor, start: int, real: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1.0 where a global id is in this shard else 0.0, local index clamped to 0 elsewhere)."""
    inside = (ids >= start) & (ids < start + real)
    return inside.float(), torch.where(inside, ids - start, 0)


def _max_argmax(xs: list[torch.Tensor], start: int, group: Any) -> tuple[torch.Tensor, ...]:
    """Global max `[len(xs), n]` (fp32) and the smallest global id reaching it `[len(xs), n]`."""
    vals, idx = zip(*(x.max(dim=-1) for x in xs), strict=True)
    local = torch.stack([v.to(_acc(xs[0])) for v in vals])
    gmax = all_reduce_(local.clone(), "max", group)
    cand = torch.where(local == gmax, torch.stack(idx) + start, _BIG)
    return gmax, all_reduce_(cand, "min", group)


def _exp_shifted(x: torch.Tensor, shift_n: torch.Tensor, scale: float, out: torch.Tensor):
    """`out = exp((x - shift) * scale)` in fp32 without an fp32 copy of `x`."""
    torch.sub(x, shift_n[:, None], out=out)
    if scale != 1.0:
        out.mul_(scale)
    return out.exp_()


def _log_softmax_into(x, shift_n, log_sum_n, scale, out):
    """`out = (x - shift) * scale - log_sum`: log-probabilities of one shard."""
    torch.sub(x, shift_n[:, None], out=out)
    if scale != 1.0:
        out.mul_(scale)
    return out.sub_(log_sum_n[:, None])


def _bucket_kl(lp_nb, lq_nb, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """KL over buckets from log-probs `[n, B]` (-inf allowed); returns (kl_n, coef_nb for grad)."""
    has_p, has_q = lp_nb > -torch.inf, lq_nb > -torch.inf
    if reverse:
        kl = torch.where(has_p, lp_nb.exp() * (lp_nb - lq_nb), 0.0).sum(-1)
        coef = torch.where(has_p, lp_nb - lq_nb - kl[:, None], 0.0)
    else:
        kl = torch.where(has_q, lq_nb.exp() * (lq_nb - lp_nb), 0.0).sum(-1)
        coef = torch.where(has_p, 1.0 - (lq_nb - lp_nb).exp(), 0.0)
    return kl, coef


def _full_kl_partial(zr, ur, st, inv, reverse, buf, buf2) -> torch.Tensor:
    """This shard's part of sum_v q (log q - log p) (forward) or p (log p - log q) (reverse)."""
    lq = _log_softmax_into(ur, st["mu"], st["log_su"], inv, buf)
    lp = _log_softmax_into(zr, st["mz"], st["log_sz"], inv, buf2)
    if reverse:
        lq.sub_(lp).neg_()  # log p - log q
        return lp.exp_().mul_(lq).sum(-1)
    lp.sub_(lq).neg_()  # log q - log p
    return lq.exp_().mul_(lp).sum(-1)


def _forward_stats(zr, ur, labels, t_ids, inv, start, group) -> dict[str, torch.Tensor]:
    """Maxima, argmaxes, log-sum-exps, label logit, top-K gathers and residual (all reduced)."""
    n = zr.shape[0]
    gmax, gargs = _max_argmax([zr] if ur is None else [zr, ur], start, group)
    st = {"mz": gmax[0], "s_top1": gargs[0]}
    buf = torch.empty(zr.shape, dtype=_acc(zr), device=zr.device)
    cols = {"s1": _exp_shifted(zr, st["mz"], 1.0, buf).sum(-1)}
    cols["sz"] = cols["s1"] if inv == 1.0 else _exp_shifted(zr, st["mz"], inv, buf).sum(-1)
    lab_in, lab_loc = _local_index(labels, start, zr.shape[1])
    cols["z_label"] = zr.gather(1, lab_loc[:, None]).squeeze(1).to(buf.dtype) * lab_in
    if t_ids is not None:  # buf holds exp((z - mz) / tau): zero the top-K ids, sum the rest
        id_in, id_loc = _local_index(t_ids, start, zr.shape[1])
        cols["z_at"] = zr.gather(1, id_loc).to(buf.dtype) * id_in
        buf.scatter_add_(1, id_loc, -buf.gather(1, id_loc) * id_in)  # x + (-x) == 0 exactly
        cols["rest"] = buf.sum(-1)
    if ur is not None:
        st["mu"], st["t_top1"] = gmax[1], gargs[1]
        cols["su"] = _exp_shifted(ur, st["mu"], inv, buf).sum(-1)
    del buf
    names = list(cols)
    widths = [c.shape[1] if c.dim() == 2 else 1 for c in cols.values()]
    flat = torch.cat([c.reshape(n, -1) for c in cols.values()], dim=1)
    flat = all_reduce_(flat, "sum", group)
    for name, part in zip(names, flat.split(widths, dim=1), strict=True):
        st[name] = part if name == "z_at" else part.squeeze(1)
    st["log_s1"], st["log_sz"] = st["s1"].log(), st["sz"].log()
    if ur is not None:
        st["log_su"] = st["su"].log()
    return st


class _VocabParallelCEKL(torch.autograd.Function):
    """Per-token CE (temperature 1) and KL (temperature tau) on sharded logits; see module doc."""

    @staticmethod
    def forward(ctx, z, labels, valid, t_logits, t_ids, t_lq, t_res, tau, reverse, vocab, group):
        start, real = shard_bounds(z.shape[-1], vocab, group)
        zr = z[:, :real]
        ur = None if t_logits is None else t_logits[:, :real]
        inv = 1.0 / tau
        st = _forward_stats(zr, ur, labels, t_ids, inv, start, group)
        ce = st["mz"] + st["log_s1"] - st["z_label"]
        coef = None
        if ur is not None:
            buf = torch.empty(zr.shape, dtype=_acc(z), device=z.device)
            kl = _full_kl_partial(zr, ur, st, inv, reverse, buf, torch.empty_like(buf))
            del buf
            kl = all_reduce_(kl, "sum", group)
            t_top1 = st["t_top1"]
        elif t_ids is not None:
            lp_k = (st["z_at"] - st["mz"][:, None]) * inv - st["log_sz"][:, None]
            lp_rest = st["rest"].log() - st["log_sz"]
            lp_nb = torch.cat([lp_k, lp_rest[:, None]], dim=1)
            lq_nb = torch.cat([t_lq, t_res[:, None]], dim=1).to(lp_k.dtype)
            kl, coef = _bucket_kl(lp_nb, lq_nb, reverse)
            coef = torch.cat([coef, lp_k.exp()], dim=1)  # [coef_k, coef_rest, P_k]
            t_top1 = t_ids.gather(1, t_lq.argmax(1, keepdim=True)).squeeze(1)
        else:
            kl, t_top1 = torch.zeros_like(ce), torch.full_like(st["s_top1"], -1)
        ce, kl = torch.where(valid, ce, 0.0), torch.where(valid, kl, 0.0)  # masked rows: no loss
        if coef is not None:
            coef = torch.where(valid[:, None], coef, 0.0)
        per_token = torch.stack([st["mz"], st["log_s1"], st["log_sz"], kl])
        extra = [st["mu"], st["log_su"]] if ur is not None else []
        ctx.save_for_backward(z, labels, valid, t_logits, t_ids, coef, per_token, *extra)
        ctx.cfg = (inv, reverse, start, real)
        ctx.mark_non_differentiable(st["s_top1"], t_top1)
        return ce, kl, st["s_top1"], t_top1

    @staticmethod
    def backward(ctx, g_ce, g_kl, _g1, _g2):
        z, labels, valid, t_logits, t_ids, coef, per_token, *extra = ctx.saved_tensors
        inv, reverse, start, real = ctx.cfg
        g_ce, g_kl = torch.where(valid, g_ce, 0.0), torch.where(valid, g_kl, 0.0)
        mz, log_s1, log_sz, kl = per_token
        zr = z[:, :real]
        alloc = torch.zeros if real < z.shape[1] else torch.empty
        out = alloc(z.shape, dtype=_acc(z), device=z.device)
        res, tmp = out[:, :real], torch.empty(zr.shape, dtype=out.dtype, device=z.device)
        stats = (mz, log_sz, kl)
        if _kd_grad(zr, t_logits, t_ids, coef, extra, stats, inv, reverse, start, res, tmp):
            res.mul_((g_kl * inv)[:, None])
            res.add_(_exp_shifted(zr, mz + log_s1, 1.0, tmp).mul_(g_ce[:, None]))
        else:
            _exp_shifted(zr, mz + log_s1, 1.0, res).mul_(g_ce[:, None])
        del tmp
        lab_in, lab_loc = _local_index(labels, start, real)
        res.scatter_add_(1, lab_loc[:, None], -(g_ce * lab_in)[:, None])
        grad = out if z.dtype == out.dtype else out.to(z.dtype)
        return grad, *([None] * 11)


def _kd_grad(zr, t_logits, t_ids, coef, extra, stats, inv, reverse, start, res, tmp) -> bool:
    """Write dKL/d(z / tau) of this shard into `res` (`tmp`: scratch); False without a teacher."""
    mz, log_sz, kl = stats
    if t_logits is not None:
        mu, log_su = extra
        lp = _log_softmax_into(zr, mz, log_sz, inv, res)
        lq = _log_softmax_into(t_logits[:, : zr.shape[1]], mu, log_su, inv, tmp)
        if reverse:  # p (log p - log q - KL)
            lq.sub_(lp).neg_().sub_(kl[:, None])
            lp.exp_().mul_(lq)
        else:  # p - q
            lp.exp_().sub_(lq.exp_())
        return True
    if t_ids is not None:
        k = t_ids.shape[1]
        coef_k, coef_rest, p_k = coef[:, :k], coef[:, k], coef[:, k + 1 :]
        p = _log_softmax_into(zr, mz, log_sz, inv, res).exp_().mul_(coef_rest[:, None])
        id_in, id_loc = _local_index(t_ids, start, zr.shape[1])
        p.scatter_add_(1, id_loc, p_k * (coef_k - coef_rest[:, None]) * id_in)
        return True
    return False


def vocab_parallel_ce_kl(
    student_nv: torch.Tensor,
    labels_n: torch.Tensor,
    temperature: float = 1.0,
    teacher_logits_nv: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    reverse: bool = False,
    vocab_size: int | None = None,
    group: Any = None,
    valid_n: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token `(ce_n, kl_n, student_top1_n, teacher_top1_n)`; no reduction over tokens.

    `ce_n` is the temperature-1 cross-entropy against `labels_n` (global ids); `kl_n` the KL at
    `temperature` against either `teacher_logits_nv` (sharded like the student) or
    `teacher_topk = (ids_nk, logprobs_nk, residual_n)`: global ids (unique per token), the
    teacher's log-probs at temperature tau and the log of its mass outside the top-K (-inf if
    none); with neither, `kl_n` is zero and `teacher_top1_n` is -1. Only `student_nv` gets a
    gradient (the teacher is detached). `reverse` selects KL(p || q) instead of KL(q || p).
    Rows where `valid_n` (bool `[n]`) is False give exactly 0 and no gradient, whatever their
    inputs (labels and top-K ids there must still be in range).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if teacher_logits_nv is not None and teacher_topk is not None:
        raise ValueError("give teacher_logits_nv or teacher_topk, not both")
    t_logits = None if teacher_logits_nv is None else teacher_logits_nv.detach()
    t_ids, t_lq, t_res = (None, None, None) if teacher_topk is None else teacher_topk
    if t_ids is not None:
        t_ids, t_lq, t_res = t_ids.long(), t_lq.detach(), t_res.detach()
    if valid_n is None:
        valid_n = torch.ones(labels_n.shape, dtype=torch.bool, device=labels_n.device)
    return _VocabParallelCEKL.apply(
        student_nv,
        labels_n.long(),
        valid_n.bool(),
        t_logits,
        t_ids,
        t_lq,
        t_res,
        float(temperature),
        bool(reverse),
        vocab_size,
        group,
    )


@torch.no_grad()
def vocab_parallel_topk(
    logits_nv: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher top-K over the sharded vocabulary: `(ids_nk, logprobs_nk, residual_n)`.

    ids are global (int64), sorted by decreasing probability; logprobs (fp32) are at
    `temperature`; residual is the log of the probability mass outside the top-K, summed
    explicitly over the other tokens (exactly -inf when K equals the vocabulary size).
    """
    start, real = shard_bounds(logits_nv.shape[-1], vocab_size, group)
    world = _world(group)[1]
    total = (world - 1) * logits_nv.shape[-1] + real if vocab_size is None else vocab_size
    if not 1 <= k <= total:
        raise ValueError(f"topk={k} must be in [1, vocab size {total}]")
    ur = logits_nv[:, :real]
    n, kk = ur.shape[0], min(k, real)
    vals, idx = ur.topk(kk, dim=-1)
    cand_v = torch.full((n, k), -torch.inf, dtype=_acc(ur), device=ur.device)
    cand_i = torch.full((n, k), -1, dtype=torch.int64, device=ur.device)
    cand_v[:, :kk], cand_i[:, :kk] = vals.to(cand_v.dtype), idx + start
    top_v, pos = _all_gather_cat(cand_v, group).topk(k, dim=-1)
    ids = _all_gather_cat(cand_i, group).gather(1, pos)
    m, inv = top_v[:, 0].clone(), 1.0 / temperature
    buf = _exp_shifted(ur, m, inv, torch.empty(ur.shape, dtype=_acc(ur), device=ur.device))
    sums = [buf.sum(-1)]
    id_in, id_loc = _local_index(ids, start, real)
    buf.scatter_add_(1, id_loc, -buf.gather(1, id_loc) * id_in)
    sums.append(buf.sum(-1))
    log_s, log_rest = all_reduce_(torch.stack(sums), "sum", group).log()
    return ids, (top_v - m[:, None]) * inv - log_s[:, None], log_rest - log_s
