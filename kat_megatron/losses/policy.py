"""Clipped policy-gradient loss for `kat train` stage rl (Step-SRPO / GRPO; critic-free).

Usage:
    loss_sum, normaliser, metrics = policy_loss(
        logprobs_bt, old_logprobs_bt, advantages_bt, mask_bt, PolicyLossConfig(),
        ref_logprobs_bt=None, rollout_logprobs_bt=None, entropy_bt=None)

All tensors are `[b, t]` over the generated tokens (`mask_bt` 1 on tokens that carry loss).
Per token, with ratio rho = exp(clamp(logprobs - old_logprobs, -20, 20)) and advantage A:

    pg = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))       (PPO, clip-higher)
    pg = min(pg, -A * dual_clip_c)  where A < 0                           (dual clip, optional)
    l  = w_is * pg + kl_coef * KL_k(logprobs, ref) - entropy_coef * H

The log-ratio bound (LOG_RATIO_BOUND = 20, verl's) keeps exp finite: float32 exp overflows
above ~88.7, and an inf rho makes the unselected PPO branch's gradient 0 * inf = NaN (seen with
`rl.ppo_epochs > 1`). Inside the bound nothing changes; outside it the clipped branch already
decides the value, and the clamp's zero gradient matches what clipping gives.

w_is = min(exp(clamp(old - rollout, -20, 20)), is_cap), detached (truncated importance sampling between the
rollout engine's and the trainer's log-probs; `is_correction="truncated"`). The KL term is
dropped when `kl_in_reward` (the trainer subtracts `apply_kl_in_reward` from the rewards).

Reduction (`aggregation`; the loop divides the summed `loss_sum` by the summed `normaliser`
over micro-batches and DP ranks, as for the LM loss):
- token_mean: loss_sum = sum of l over valid tokens; normaliser = number of valid tokens;
- seq_mean_token_mean: loss_sum = sum over sequences of mean_t l; normaliser = sequences;
- seq_mean_token_sum: loss_sum = sum over sequences of sum_t l; normaliser = sequences.
Sequences without a valid token count for neither. Metrics are detached float `[sum, count]`
tensors (the same keys always, count 0 when unused) over valid tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
IS_CORRECTIONS = ("none", "truncated")
LOG_RATIO_BOUND = 20.0
"""|log rho| is clamped to this before exp (verl's bound); exp(20) = 4.9e8, far from overflow."""
METRIC_KEYS = (
    "pg_loss", "clip_frac", "dual_clip_frac", "kl", "entropy", "is_ratio_mean", "approx_kl"
)  # fmt: skip


@dataclass
class PolicyLossConfig:
    """Clipped-ratio policy loss options (verl / TRL names in docs/step_srpo.md)."""

    clip_low: float = 0.2
    """rho is clipped below at 1 - clip_low (verl clip_ratio_low, TRL epsilon)."""
    clip_high: float = 0.28
    """rho is clipped above at 1 + clip_high (DAPO's clip-higher; verl clip_ratio_high)."""
    aggregation: str = "token_mean"
    """One of AGGREGATIONS (verl loss_agg_mode with '_' for '-')."""
    kl_coef: float = 0.0
    """Weight of the KL to the frozen reference; 0 = no reference needed."""
    kl_estimator: str = "k1"
    """k1, k2 or k3 (Schulman, "Approximating KL divergence")."""
    kl_in_reward: bool = False
    """KL enters the rewards (`apply_kl_in_reward`) instead of the loss."""
    is_correction: str = "none"
    """"truncated": weight each token's pg loss by min(exp(old - rollout), is_cap)."""
    is_cap: float = 2.0
    entropy_coef: float = 0.0
    """Entropy bonus: the loss gets -entropy_coef * H per token (needs entropy_bt)."""
    dual_clip_c: float | None = None
    """Dual clip (Ye et al. 2020): for A < 0 the loss is capped at -A * c; c > 1. None: off."""

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"policy_loss.clip_low={self.clip_low}: expected in [0, 1)")
        if self.clip_high < 0:
            raise ValueError(f"policy_loss.clip_high={self.clip_high}: expected >= 0")
        for name, value, known in (
            ("aggregation", self.aggregation, AGGREGATIONS),
            ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
            ("is_correction", self.is_correction, IS_CORRECTIONS),
        ):
            if value not in known:
                raise ValueError(f"policy_loss.{name}={value!r}: expected one of {list(known)}")
        if self.kl_coef < 0:
            raise ValueError(f"policy_loss.kl_coef={self.kl_coef}: expected >= 0")
        if self.is_cap < 1:
            raise ValueError(f"policy_loss.is_cap={self.is_cap}: expected >= 1")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"policy_loss.dual_clip_c={self.dual_clip_c}: expected > 1 or None")

    @property
    def needs_ref(self) -> bool:
        """A frozen reference model is needed (KL in the loss or in the reward)."""
        return self.kl_coef > 0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi, with log r = ref - logprobs:
    k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r (unbiased, >= 0)."""
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl estimator {estimator!r}: expected one of {list(KL_ESTIMATORS)}")


def apply_kl_in_reward(
    rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    coef: float,
    mask: torch.Tensor | None = None,
    estimator: str = "k1",
) -> torch.Tensor:
    """Rewards minus `coef` * KL (no gradient). Token-level rewards `[b, t]` get the per-token
    KL subtracted; sequence rewards `[b]` get the sum over the (masked) tokens of `[b, t]`."""
    kl = kl_penalty(logprobs.detach().float(), ref_logprobs.detach().float(), estimator)
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    if rewards.shape == kl.shape:
        return rewards - coef * kl
    if rewards.dim() == 1 and kl.dim() == 2 and rewards.shape[0] == kl.shape[0]:
        return rewards - coef * kl.sum(dim=1)
    raise ValueError(f"rewards {tuple(rewards.shape)} vs logprobs {tuple(kl.shape)}")


def _pair(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.stack([total.detach().float(), count.detach().float()])


def policy_loss(
    logprobs_bt: torch.Tensor,
    old_logprobs_bt: torch.Tensor,
    advantages_bt: torch.Tensor,
    mask_bt: torch.Tensor,
    cfg: PolicyLossConfig,
    ref_logprobs_bt: torch.Tensor | None = None,
    rollout_logprobs_bt: torch.Tensor | None = None,
    entropy_bt: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`(loss_sum, normaliser, metrics)` of the clipped policy loss (see the module docstring).

    `normaliser` is an int64 count (tokens or sequences); gradients flow through `logprobs_bt`
    (and `entropy_bt` when `entropy_coef` > 0) only.
    """
    shape = logprobs_bt.shape
    for name, t in (("old_logprobs", old_logprobs_bt), ("advantages", advantages_bt),
                    ("mask", mask_bt), ("ref_logprobs", ref_logprobs_bt),
                    ("rollout_logprobs", rollout_logprobs_bt), ("entropy", entropy_bt)):  # fmt: skip
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} {tuple(t.shape)} vs logprobs {tuple(shape)}")
    if logprobs_bt.dim() != 2:
        raise ValueError(f"logprobs: expected [b, t], got {tuple(shape)}")
    valid = mask_bt.detach() > 0
    mask = valid.float()
    n_tok = mask.sum()
    zero = torch.zeros((), dtype=torch.float32, device=logprobs_bt.device)
    # Padding may hold any value (even inf): zero it before it meets exp or a gradient.
    logp = torch.where(valid, logprobs_bt.float(), zero)
    old = torch.where(valid, old_logprobs_bt.detach().float(), zero)
    adv = torch.where(valid, advantages_bt.detach().float(), zero)

    log_ratio = torch.clamp(logp - old, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).float()
    metrics = {k: _pair(zero, zero) for k in METRIC_KEYS}
    if cfg.dual_clip_c is not None:
        dual = (adv < 0) & (pg > -adv * cfg.dual_clip_c)
        pg = torch.where(dual, -adv * cfg.dual_clip_c, pg)
        metrics["dual_clip_frac"] = _pair((dual.float() * mask).sum(), n_tok)
    if cfg.is_correction == "truncated":
        if rollout_logprobs_bt is None:
            raise ValueError("is_correction='truncated' needs rollout_logprobs_bt")
        rollout = torch.where(valid, rollout_logprobs_bt.detach().float(), zero)
        raw = torch.exp(torch.clamp(old - rollout, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        pg = pg * torch.clamp(raw, max=cfg.is_cap)
        metrics["is_ratio_mean"] = _pair((raw * mask).sum(), n_tok)
    per_token = pg
    metrics["pg_loss"] = _pair((pg * mask).sum(), n_tok)
    metrics["clip_frac"] = _pair((clipped * mask).sum(), n_tok)
    metrics["approx_kl"] = _pair(((torch.expm1(log_ratio) - log_ratio) * mask).sum(), n_tok)

    if ref_logprobs_bt is not None:
        ref = torch.where(valid, ref_logprobs_bt.detach().float(), zero)
        kl = kl_penalty(logp, ref, cfg.kl_estimator)
        metrics["kl"] = _pair((kl * mask).sum(), n_tok)
        if cfg.kl_coef > 0 and not cfg.kl_in_reward:
            per_token = per_token + cfg.kl_coef * kl
    elif cfg.kl_coef > 0 and not cfg.kl_in_reward:
        raise ValueError("policy_loss.kl_coef > 0 needs ref_logprobs_bt")
    if entropy_bt is not None:
        ent = torch.where(valid, entropy_bt.float(), zero)
        metrics["entropy"] = _pair(ent.sum(), n_tok)
        if cfg.entropy_coef != 0:
            per_token = per_token - cfg.entropy_coef * ent
    elif cfg.entropy_coef != 0:
        raise ValueError("policy_loss.entropy_coef != 0 needs entropy_bt")

    masked = per_token * mask
    if cfg.aggregation == "token_mean":
        return masked.sum(), n_tok.to(torch.int64), metrics
    tokens_b = mask.sum(dim=1)
    seq_b = masked.sum(dim=1)
    if cfg.aggregation == "seq_mean_token_mean":
        seq_b = seq_b / tokens_b.clamp(min=1)
    return seq_b.sum(), (tokens_b > 0).sum().to(torch.int64), metrics
