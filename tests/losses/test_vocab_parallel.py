"""Vocab-parallel CE/KL and top-K: explicit torch formulas (one rank) and real gloo ranks (TP=2).

    .venv/bin/python -m pytest tests/losses/test_vocab_parallel.py -q

Tolerances: fp64 runs match the formulas to 1e-10 (only rounding of fp64 log-sum-exps). The
fp32 TP=2 runs match a single-rank fp32 reference on the gathered logits to 1e-6 (the issue's
bound): both sides round log-sum-exps of magnitude ~5 (unit-scale logits, V = 96) at fp32 eps
1.2e-7, and the shard-wise sums only change the summation order.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kat_megatron.losses.kd import KDConfig, TeacherLogits, documents_from_eod, mtp_kd_loss
from kat_megatron.losses.vocab_parallel import (
    shard_bounds,
    vocab_parallel_ce_kl,
    vocab_parallel_topk,
)

sys.path.insert(0, str(Path(__file__).parent))
import tp_kd_worker as W  # noqa: E402

TP = 2


def ref_ce_kl(z, u, labels, tau, reverse, topk_ids=None):
    """Explicit formulas on full logits; with `topk_ids`, the K + 1 bucket KL (K buckets if K=V)."""
    p, q = torch.softmax(z / tau, -1), torch.softmax(u / tau, -1)
    if topk_ids is not None:
        rest = torch.ones_like(p, dtype=torch.bool).scatter(1, topk_ids, False)
        keep_rest = 1 if topk_ids.shape[1] < z.shape[1] else 0  # K = V: no residual bucket
        p = torch.cat([p.gather(1, topk_ids), (p * rest).sum(-1, keepdim=True)[:, :keep_rest]], 1)
        q = torch.cat([q.gather(1, topk_ids), (q * rest).sum(-1, keepdim=True)[:, :keep_rest]], 1)
    a, b = (p, q) if reverse else (q, p)
    kl = (a * (a.log() - b.log())).sum(-1)
    ce = torch.nn.functional.cross_entropy(z, labels, reduction="none")
    return ce, kl


def ref_grad(z, u, labels, tau, reverse, g_ce, g_kl, topk_ids=None):
    z = z.clone().requires_grad_()
    ce, kl = ref_ce_kl(z, u, labels, tau, reverse, topk_ids)
    (ce * g_ce + kl * g_kl).sum().backward()
    return ce.detach(), kl.detach(), z.grad


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("topk", [0, 7, 40])
def test_one_rank_matches_formulas_fp64(tau, reverse, topk):
    g = torch.Generator().manual_seed(0)
    n, v = 6, 40
    z, u = torch.randn(n, v, generator=g, dtype=torch.float64) * 3, torch.randn(n, v) * 3
    u = u.double()
    labels = torch.randint(0, v, (n,), generator=g)
    g_ce, g_kl = torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    ids = u.topk(topk, -1).indices if topk else None
    ce_r, kl_r, grad_r = ref_grad(z, u, labels, tau, reverse, g_ce, g_kl, ids)
    zz = z.clone().requires_grad_()
    kw = {"teacher_topk": vocab_parallel_topk(u, topk, tau)} if topk else {"teacher_logits_nv": u}
    ce, kl, s_top1, t_top1 = vocab_parallel_ce_kl(zz, labels, tau, reverse=reverse, **kw)
    (ce * g_ce + kl * g_kl).sum().backward()
    torch.testing.assert_close(ce, ce_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(kl, kl_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(zz.grad, grad_r, atol=1e-10, rtol=0)
    assert torch.equal(s_top1, z.argmax(-1)) and torch.equal(t_top1, u.argmax(-1))


def test_topk_with_k_equal_vocab_is_full_kd():
    g = torch.Generator().manual_seed(1)
    z, u = torch.randn(8, 30, generator=g), torch.randn(8, 30, generator=g)
    labels = torch.randint(0, 30, (8,), generator=g)
    for reverse in (False, True):
        ids, lq, res = vocab_parallel_topk(u, 30, 2.0)
        assert torch.isneginf(res).all()
        outs = []
        for kw in ({"teacher_logits_nv": u}, {"teacher_topk": (ids, lq, res)}):
            zz = z.clone().requires_grad_()
            ce, kl, _, _ = vocab_parallel_ce_kl(zz, labels, 2.0, reverse=reverse, **kw)
            (ce + 3 * kl).sum().backward()
            outs.append((kl.detach(), zz.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-6, rtol=0)


def test_topk_residual_is_the_explicit_rest_mass():
    u = torch.randn(5, 50, dtype=torch.float64)
    ids, lq, res = vocab_parallel_topk(u, 6, temperature=1.7)
    q = torch.softmax(u / 1.7, -1)
    assert torch.equal(ids, u.topk(6, -1).indices)
    torch.testing.assert_close(lq, q.gather(1, ids).log(), atol=1e-12, rtol=0)
    rest = q.sum(-1) - q.gather(1, ids).sum(-1)
    torch.testing.assert_close(res, rest.log(), atol=1e-10, rtol=0)


def test_padded_vocab_columns_are_ignored():
    g = torch.Generator().manual_seed(2)
    z, u = torch.randn(4, 24, generator=g), torch.randn(4, 24, generator=g)
    labels = torch.randint(0, 20, (4,), generator=g)
    zz = z.clone().requires_grad_()
    ce, kl, _, _ = vocab_parallel_ce_kl(zz, labels, 1.5, teacher_logits_nv=u, vocab_size=20)
    (ce + kl).sum().backward()
    ce_r, kl_r, grad_r = ref_grad(z[:, :20], u[:, :20], labels, 1.5, False, 1.0, 1.0)
    torch.testing.assert_close(kl, kl_r, atol=1e-6, rtol=0)
    torch.testing.assert_close(ce, ce_r, atol=1e-6, rtol=0)
    torch.testing.assert_close(zz.grad[:, :20], grad_r, atol=1e-6, rtol=0)
    assert torch.count_nonzero(zz.grad[:, 20:]) == 0
    with pytest.raises(ValueError, match="vocab_size"):
        shard_bounds(12, 13, None)


def test_bf16_logits_give_bf16_grads_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    z, u = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    labels = torch.randint(0, 64, (4,), generator=g)
    zb = z.bfloat16().requires_grad_()
    ce, kl, _, _ = vocab_parallel_ce_kl(zb, labels, 2.0, teacher_logits_nv=u.bfloat16())
    (ce + kl).sum().backward()
    assert zb.grad.dtype == torch.bfloat16 and ce.dtype == torch.float32
    _, kl_r, grad_r = ref_grad(zb.detach().float(), u.bfloat16().float(), labels, 2.0, False, 1, 1)
    torch.testing.assert_close(kl, kl_r, atol=1e-5, rtol=0)  # fp32 math on bf16-rounded inputs
    torch.testing.assert_close(zb.grad.float(), grad_r, atol=4e-3, rtol=0)  # bf16 grad rounding


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory, run_ranks):
    """Run tp_kd_worker.py on TP=2 gloo ranks once; {rank: results} and the full inputs."""
    out = tmp_path_factory.mktemp("tp_kd")
    run_ranks([W.__file__, out], nproc=TP, timeout=90)
    ranks = {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(TP)}
    return ranks, torch.load(out / "inputs.pt")


def _shard_cols(x: torch.Tensor, r: int) -> torch.Tensor:
    return x.chunk(TP, dim=-1)[r]


@pytest.mark.parametrize("kind", ["full", "topk"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("reverse", [False, True])
def test_tp2_matches_gathered_reference(tp_results, kind, tau, reverse):
    ranks, x = tp_results
    key = f"{kind}_t{tau}_r{reverse}"
    ids = ranks[0][key]["topk"][0] if kind == "topk" else None
    if ids is not None:
        assert torch.equal(ids, x["u"].topk(W.K, -1).indices)
    ce_r, kl_r, grad_r = ref_grad(
        x["z"], x["u"], x["labels"], tau, reverse, x["g_ce"], x["g_kl"], ids
    )
    for r, res in ranks.items():
        case = res[key]
        torch.testing.assert_close(case["ce"], ce_r, atol=1e-6, rtol=0)
        torch.testing.assert_close(case["kl"], kl_r, atol=1e-6, rtol=0)
        torch.testing.assert_close(case["grad"], _shard_cols(grad_r, r), atol=1e-6, rtol=0)
        assert torch.equal(case["s_top1"], x["z"].argmax(-1))
        assert torch.equal(case["t_top1"], x["u"].argmax(-1))


def test_tp2_topk_equal_vocab_is_full_kd(tp_results):
    ranks, x = tp_results
    ce_r, kl_r, grad_r = ref_grad(x["z"], x["u"], x["labels"], 2.0, True, x["g_ce"], x["g_kl"])
    for r, res in ranks.items():
        case = res["topk_eq_v"]
        assert torch.isneginf(case["topk"][2]).all()  # no mass outside the top-K
        assert torch.equal(case["topk"][0][:, 0], x["u"].argmax(-1))
        torch.testing.assert_close(case["kl"], kl_r, atol=1e-6, rtol=0)
        torch.testing.assert_close(case["grad"], _shard_cols(grad_r, r), atol=1e-6, rtol=0)


def test_tp2_padded_vocab(tp_results):
    ranks, x = tp_results
    v = W.V - W.PAD
    ce_r, kl_r, grad_r = ref_grad(
        x["z"][:, :v], x["u"][:, :v], x["labels"], 2.0, False, x["g_ce"], x["g_kl"]
    )
    grad_r = torch.nn.functional.pad(grad_r, (0, W.PAD))
    for r, res in ranks.items():
        torch.testing.assert_close(res["padded"]["kl"], kl_r, atol=1e-6, rtol=0)
        torch.testing.assert_close(res["padded"]["ce"], ce_r, atol=1e-6, rtol=0)
        torch.testing.assert_close(res["padded"]["grad"], _shard_cols(grad_r, r), atol=1e-6, rtol=0)


def test_tp2_mtp_kd_loss_matches_one_rank(tp_results):
    ranks, x = tp_results
    heads = [h.clone().requires_grad_() for h in x["heads"]]
    loss_mask = torch.ones(W.B, W.S)
    loss_mask[1, -3:] = 0
    tokens = x["tokens"][:, :-1]
    docs = documents_from_eod(tokens, eod_id=int(tokens[0, 4]))
    cfg = KDConfig(alpha=0.3, temperature=2.0, mtp_loss_scaling_factor=0.6)
    loss, count, metrics = mtp_kd_loss(
        heads, x["tokens"][:, 1:], loss_mask, TeacherLogits(x["teacher"]), cfg, docs
    )
    loss.backward()
    for r, res in ranks.items():
        got = res["mtp"]
        assert int(got["count"]) == int(count)
        torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-5, rtol=1e-7)
        for name, value in metrics.items():
            torch.testing.assert_close(got["metrics"][name], value, atol=1e-5, rtol=1e-7)
        for g_tp, h in zip(got["grads"], heads, strict=True):
            torch.testing.assert_close(g_tp, _shard_cols(h.grad, r), atol=1e-6, rtol=0)
