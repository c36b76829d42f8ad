"""Policy loss: clipped ratio by hand, aggregation modes, truncated IS, KL estimators, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kat_megatron.losses.policy import (
    METRIC_KEYS,
    PolicyLossConfig,
    apply_kl_in_reward,
    kl_penalty,
    policy_loss,
)

LN = math.log


def one_token(ratio: float, adv: float, cfg: PolicyLossConfig, **kw):
    """The loss of a single valid token with old log-prob -1 and new log-prob -1 + log(ratio)."""
    lp = torch.tensor([[-1.0 + LN(ratio)]], requires_grad=True)
    loss, n, m = policy_loss(lp, torch.tensor([[-1.0]]), torch.tensor([[adv]]),
                             torch.ones(1, 1), cfg, **kw)  # fmt: skip
    (g,) = torch.autograd.grad(loss, lp)
    return loss.item(), int(n), m, g.item()


@pytest.mark.parametrize(
    "ratio,adv,loss,clipped,grad",
    [
        # A > 0: the objective rho * A is capped at (1 + 0.28) * A; no gradient beyond
        (1.5, 1.0, -1.28, 1, 0.0),
        (1.25, 2.0, -2.5, 0, -2.5),  # inside 1 + clip_high = 1.28: not clipped (clip-higher)
        (0.5, 1.0, -0.5, 0, -0.5),  # A > 0 and rho < 0.8: max(-0.5, -0.8) = -0.5, unclipped
        # A < 0: loss -A * rho floored at -A * (1 - 0.2)
        (0.5, -1.0, 0.8, 1, 0.0),
        (1.5, -1.0, 1.5, 0, 1.5),  # A < 0 and rho > 1.28: max(1.5, 1.28), unclipped
        (1.0, 0.0, 0.0, 0, 0.0),
    ],
)
def test_clipped_ratio_by_hand(ratio, adv, loss, clipped, grad):
    # d loss / d logp = -A * rho where unclipped (d rho / d logp = rho), 0 where clipped
    got_loss, n, m, g = one_token(ratio, adv, PolicyLossConfig())
    assert n == 1
    assert got_loss == pytest.approx(loss, abs=1e-6)  # fp32 exp/log round trip: ~1e-7
    assert g == pytest.approx(grad, abs=1e-6)
    assert m["clip_frac"].tolist() == [clipped, 1.0]
    assert m["pg_loss"][0].item() == pytest.approx(loss, abs=1e-6)


def test_clip_higher_vs_symmetric_and_dual_clip():
    symmetric = PolicyLossConfig(clip_low=0.2, clip_high=0.2)
    assert one_token(1.25, 2.0, symmetric)[0] == pytest.approx(-2.4, abs=1e-6)  # 1.2 * 2
    assert one_token(1.25, 2.0, PolicyLossConfig())[0] == pytest.approx(-2.5, abs=1e-6)
    # dual clip: A = -1, rho = 4: PPO gives max(4, 1.28) = 4, dual clip caps it at -A * 3 = 3
    assert one_token(4.0, -1.0, PolicyLossConfig())[0] == pytest.approx(4.0, abs=1e-5)
    loss, _, m, g = one_token(4.0, -1.0, PolicyLossConfig(dual_clip_c=3.0))
    assert (loss, g) == (pytest.approx(3.0, abs=1e-6), 0.0)
    assert m["dual_clip_frac"].tolist() == [1.0, 1.0]
    loss, _, m, _ = one_token(2.0, -1.0, PolicyLossConfig(dual_clip_c=3.0))  # 2 < 3: untouched
    assert loss == pytest.approx(2.0, abs=1e-6) and m["dual_clip_frac"].tolist() == [0.0, 1.0]


def batch():
    """Two sequences, 1 and 3 valid tokens, ratio 1 (loss = -A) and one inf in the padding."""
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]])
    lp = old.clone().requires_grad_(True)
    adv = torch.tensor([[4.0, 9.0, 9.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    with torch.no_grad():
        old[0, 2] = float("inf")  # padding may hold anything
    return lp, old, adv, mask


@pytest.mark.parametrize(
    "aggregation,loss_sum,normaliser",
    [
        # per-token losses: row 0 [-4], row 1 [-1, -2, -3]
        ("token_mean", -10.0, 4),  # (-4 - 1 - 2 - 3) / 4 tokens
        ("seq_mean_token_mean", -6.0, 2),  # (-4 + (-6 / 3)) / 2 sequences
        ("seq_mean_token_sum", -10.0, 2),  # (-4 + -6) / 2 sequences
    ],
)
def test_aggregation_modes(aggregation, loss_sum, normaliser):
    lp, old, adv, mask = batch()
    cfg = PolicyLossConfig(aggregation=aggregation)
    loss, n, m = policy_loss(lp, old, adv, mask, cfg)
    assert n.dtype == torch.int64 and int(n) == normaliser
    assert loss.item() == pytest.approx(loss_sum, abs=1e-6)
    assert set(m) == set(METRIC_KEYS) and m["pg_loss"].tolist() == [-10.0, 4.0]
    assert m["kl"].tolist() == [0.0, 0.0]  # unused metrics are present with count 0
    # two micro-batches (one sequence each) summed then divided give the full-batch value
    parts = [policy_loss(lp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], cfg)
             for i in range(2)]  # fmt: skip
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert total.item() == pytest.approx(loss_sum / normaliser, abs=1e-6)
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(g).all() and g[0, 1:].abs().sum() == 0


def explicit_token_mean(lp, old, adv, mask, lo, hi):
    """PPO-clip written out independently: -min(rho A, clip(rho) A), mean over valid tokens."""
    rho = torch.exp(lp - old)
    obj = torch.min(rho * adv, torch.clamp(rho, 1 - lo, 1 + hi) * adv)
    return -(obj * mask).sum() / mask.sum()


def test_gradient_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 7, generator=g) * 3
    lp = (old + 0.4 * torch.randn(4, 7, generator=g)).requires_grad_(True)
    adv = torch.randn(4, 7, generator=g)
    mask = (torch.rand(4, 7, generator=g) > 0.3).float()
    loss, n, m = policy_loss(lp, old, adv, mask, PolicyLossConfig())
    (grad,) = torch.autograd.grad(loss / n, lp)
    lp2 = lp.detach().clone().requires_grad_(True)
    ref = explicit_token_mean(lp2, old, adv, mask, 0.2, 0.28)
    (grad_ref,) = torch.autograd.grad(ref, lp2)
    # same fp32 ops in a different order: agreement to a few ulps
    assert (loss / n).item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(grad, grad_ref, atol=1e-7, rtol=1e-6)
    # the closed form: dL/dlogp = -A * rho / N on unclipped valid tokens, 0 elsewhere
    rho = torch.exp(lp.detach() - old)
    unclipped = ~(((adv > 0) & (rho > 1.28)) | ((adv < 0) & (rho < 0.8)))
    closed = torch.where(unclipped & (mask > 0), -adv * rho / mask.sum(), torch.zeros(()))
    assert torch.allclose(grad, closed, atol=1e-7, rtol=1e-6)
    clipped = (~unclipped & (mask > 0)).sum().item()
    assert m["clip_frac"].tolist() == [float(clipped), mask.sum().item()] and clipped > 0


def test_truncated_importance_sampling():
    # trainer old log-probs vs rollout engine: exp(old - rollout) = [3, 0.5] -> w = [2, 0.5]
    old = torch.tensor([[-1.0, -1.0]])
    rollout = old - torch.tensor([[LN(3.0), LN(0.5)]])
    lp = old.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0]])
    cfg = PolicyLossConfig(is_correction="truncated", is_cap=2.0)
    loss, n, m = policy_loss(lp, old, adv, torch.ones(1, 2), cfg, rollout_logprobs_bt=rollout)
    # rho = 1: per-token pg = -1, weighted [-2, -0.5] -> sum -2.5 over 2 tokens
    assert loss.item() == pytest.approx(-2.5, abs=1e-6) and int(n) == 2
    assert m["is_ratio_mean"].tolist() == [pytest.approx(3.5, abs=1e-6), 2.0]  # raw 3 + 0.5
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.allclose(g, torch.tensor([[-2.0, -0.5]]), atol=1e-6)  # w * (-A * rho)
    with pytest.raises(ValueError, match="rollout_logprobs_bt"):
        policy_loss(lp, old, adv, torch.ones(1, 2), cfg)


def test_kl_estimators_against_formulas_and_exact_kl():
    lp = torch.tensor([-0.1, -2.0, -0.7])
    ref = torch.tensor([-0.3, -1.0, -0.7])
    d = lp - ref  # log pi - log ref = -log r
    assert torch.allclose(kl_penalty(lp, ref, "k1"), d)
    assert torch.allclose(kl_penalty(lp, ref, "k2"), 0.5 * d**2)
    assert torch.allclose(kl_penalty(lp, ref, "k3"), torch.exp(-d) - 1 + d)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(lp, ref, "k4")
    # Monte Carlo: tokens sampled from pi; k1 and k3 are unbiased for KL(pi || ref)
    g = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    exact = (pi * (pi.log() - q.log())).sum().item()
    x = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        mc = kl_penalty(pi.log()[x], q.log()[x], est).mean().item()
        # standard error of the mean over 2e5 samples is < 0.005 for these small vocabularies
        assert mc == pytest.approx(exact, abs=0.02), est
    assert (kl_penalty(pi.log()[x], q.log()[x], "k3") >= 0).all()


def test_kl_in_loss_in_reward_and_entropy():
    old = torch.tensor([[-1.0, -2.0]])
    lp = old.clone().requires_grad_(True)
    ref = torch.tensor([[-1.5, -1.0]])
    adv = torch.zeros(1, 2)
    ent = torch.tensor([[0.5, 1.5]], requires_grad=True)
    mask = torch.ones(1, 2)
    cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    loss, n, m = policy_loss(lp, old, adv, mask, cfg, ref_logprobs_bt=ref, entropy_bt=ent)
    # k1 = lp - ref = [0.5, -1]: 0.1 * (-0.5) - 0.01 * 2 = -0.07
    assert loss.item() == pytest.approx(-0.07, abs=1e-6)
    assert m["kl"].tolist() == [-0.5, 2.0] and m["entropy"].tolist() == [2.0, 2.0]
    gl, ge = torch.autograd.grad(loss, [lp, ent])
    assert torch.allclose(gl, torch.full((1, 2), 0.1))
    assert torch.allclose(ge, torch.full((1, 2), -0.01))
    # in reward: the loss has no KL term, the metric is still reported
    cfg = PolicyLossConfig(kl_coef=0.1, kl_in_reward=True)
    loss, _, m = policy_loss(lp, old, adv, mask, cfg, ref_logprobs_bt=ref)
    assert loss.item() == 0.0 and m["kl"].tolist() == [-0.5, 2.0]
    rewards = apply_kl_in_reward(torch.tensor([1.0]), lp, ref, 0.1)  # 1 - 0.1 * (0.5 - 1)
    assert rewards.tolist() == [pytest.approx(1.05)] and not rewards.requires_grad
    tok = apply_kl_in_reward(torch.zeros(1, 2), lp, ref, 0.1, mask=torch.tensor([[1, 0]]))
    assert torch.allclose(tok, torch.tensor([[-0.05, 0.0]]))
    with pytest.raises(ValueError, match="needs ref_logprobs_bt"):
        policy_loss(lp, old, adv, mask, PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="needs entropy_bt"):
        policy_loss(lp, old, adv, mask, PolicyLossConfig(entropy_coef=0.1))


def test_approx_kl_and_validation():
    old = torch.tensor([[-1.0, -1.0]])
    lp = old + torch.tensor([[LN(2.0), 0.0]])
    _, _, m = policy_loss(lp, old, torch.ones(1, 2), torch.ones(1, 2), PolicyLossConfig())
    # k3 of KL(old || new) with r = new / old = [2, 1]: (2 - 1 - ln 2) + 0
    assert m["approx_kl"][0].item() == pytest.approx(1 - LN(2.0), abs=1e-6)
    with pytest.raises(ValueError, match=r"aggregation='seq-mean': expected one of"):
        PolicyLossConfig(aggregation="seq-mean")
    with pytest.raises(ValueError, match="clip_low"):
        PolicyLossConfig(clip_low=1.0)
    with pytest.raises(ValueError, match="dual_clip_c"):
        PolicyLossConfig(dual_clip_c=1.0)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(lp, old, torch.ones(1, 2), torch.ones(2, 2), PolicyLossConfig())


@pytest.mark.parametrize(
    "log_ratio,adv", [(100.0, 1.0), (100.0, -1.0), (-100.0, 1.0), (-100.0, -1.0)]
)
def test_large_log_ratio_gives_finite_loss_and_gradient(log_ratio, adv):
    """Far-off-policy tokens (rl.ppo_epochs > 1): |log rho| = 100 overflowed exp (float32 inf
    above ~88.7) and made the gradient NaN. With the clamp at LOG_RATIO_BOUND = 20 (verl's),
    the value is the clipped branch's (or the bound's) and every gradient is finite."""
    from kat_megatron.losses.policy import LOG_RATIO_BOUND

    old = torch.tensor([[-1.0, -1.0]])
    lp = (old + torch.tensor([[log_ratio, 0.0]])).requires_grad_(True)
    rollout = old - torch.tensor([[log_ratio, 0.0]])  # the IS log-ratio is as extreme
    cfg = PolicyLossConfig(is_correction="truncated", is_cap=2.0, dual_clip_c=3.0)
    loss, _, m = policy_loss(lp, old, torch.tensor([[adv, adv]]), torch.ones(1, 2), cfg,
                             rollout_logprobs_bt=rollout)  # fmt: skip
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(g).all(), (loss, g)
    assert all(torch.isfinite(v).all() for v in m.values())
    # the extreme token: rho = exp(+-20); the second token has rho = 1: pg = -A (times w_is = 1)
    rho = math.exp(math.copysign(LOG_RATIO_BOUND, log_ratio))
    pg = max(-adv * rho, -adv * min(max(rho, 0.8), 1.28))
    if adv < 0:
        pg = min(pg, -adv * 3.0)
    w = min(math.exp(math.copysign(LOG_RATIO_BOUND, log_ratio)), 2.0)
    assert loss.item() == pytest.approx(w * pg - adv, rel=1e-5)
