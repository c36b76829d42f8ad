"""MTP-enhanced knowledge distillation loss for `kat train` stage kd (KAT_NOTES, "MTP-KD loss").

Usage:
    cfg = KDConfig(alpha=0.5, temperature=2.0, divergence="forward_kl", mtp_loss_scaling_factor=0.3)
    loss_sum, num_tokens, metrics = mtp_kd_loss(
        [main_logits_sbv, mtp1_logits_sbv],  # student heads d = 0..D, each [s, b, V/tp]
        labels_bs, loss_mask_bs,             # Megatron batch layout [b, s]; labels[t] = x[t+1]
        TeacherLogits(teacher_logits_sbv),   # or TeacherTopK(ids_bsk, logprobs_bsk, residual_bs)
        cfg, documents=documents_from_eod(tokens_bs, eod_id), group=tp_group)

    L = sum_d w_d * sum_t [(1 - alpha) * CE_d(t) + alpha * tau^2 * KL_d(t)],  w_0 = 1, w_d = lambda/D

Head d at position t predicts x[t+1+d] = labels[t+d]; its teacher target is the teacher's
next-token distribution at position t+d. A depth-d term at t counts iff t+d < s,
loss_mask[t+d] = 1 (as Megatron-Core rolls the loss mask for its MTP heads) and x[t+1+d] is in
the document of x[t] (`Documents`; none given = one document per row).

Reduction: `loss_sum` is the weighted sum over tokens and depths, `num_tokens` the depth-0
count: the loop divides by the global count, as Megatron-Core's MTP loss does under
`calculate_per_token_loss`. Metrics are detached `[sum, count]` pairs, like `lm.py`'s.

Our decisions where KAT-V1 gives no detail (docs/mtp_kd.md): CE is at temperature 1, KL at tau;
top-K coarsens the tempered distributions into K + 1 buckets (teacher ids + the rest); the
per-token mean of every depth is over the depth-0 token count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kat_megatron.losses.vocab_parallel import vocab_parallel_ce_kl, vocab_parallel_topk

KDLossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
"""`fn(student_nv, labels_n, *, temperature, teacher_logits_nv, teacher_topk, vocab_size, group)
-> (ce_n, kd_n, student_top1_n, teacher_top1_n)`, per token, unreduced (see vocab_parallel)."""
KD_LOSSES: dict[str, KDLossFn] = {}


def register_kd_loss(name: str) -> Callable[[KDLossFn], KDLossFn]:
    """Decorator: make `fn` selectable as `KDConfig.divergence=name`."""

    def deco(fn: KDLossFn) -> KDLossFn:
        if name in KD_LOSSES:
            raise ValueError(f"KD loss {name!r} is already registered")
        KD_LOSSES[name] = fn
        return fn

    return deco


def get_kd_loss(name: str) -> KDLossFn:
    """The registered KD loss `name`; unknown names fail with the known ones."""
    if name not in KD_LOSSES:
        raise ValueError(f"unknown KD loss {name!r}; known: {sorted(KD_LOSSES)}")
    return KD_LOSSES[name]


@register_kd_loss("forward_kl")
def forward_kl(student_nv: torch.Tensor, labels_n: torch.Tensor, **kw: Any):
    """KL(q_teacher || p_student): mode-covering, the classic KD direction."""
    return vocab_parallel_ce_kl(student_nv, labels_n, reverse=False, **kw)


@register_kd_loss("reverse_kl")
def reverse_kl(student_nv: torch.Tensor, labels_n: torch.Tensor, **kw: Any):
    """KL(p_student || q_teacher): mode-seeking (as in MiniLLM / on-policy distillation)."""
    return vocab_parallel_ce_kl(student_nv, labels_n, reverse=True, **kw)


@dataclass
class KDConfig:
    """The MTP-KD loss; `alpha`, `temperature`, `topk`, `divergence` and lambda of KAT_NOTES."""

    alpha: float = 0.5
    """Weight of the KD term; (1 - alpha) weights CE. 0 = CE only (no teacher needed)."""
    temperature: float = 1.0
    """tau: both distributions are softened by logits / tau; the KL term is scaled by tau^2."""
    topk: int = 0
    """0: the full teacher distribution (online teacher). K > 0: teacher top-K ids plus one
    bucket for the remaining mass. An offline teacher's stored K is used (0 or equal to it)."""
    divergence: str = "forward_kl"
    """Name in `KD_LOSSES`: forward_kl (KL(q || p)) or reverse_kl (KL(p || q))."""
    mtp_loss_scaling_factor: float = 0.1
    """lambda: MTP depth d >= 1 is weighted lambda / D (Megatron-Core's name for it)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"kd.alpha={self.alpha!r}: expected a number in [0, 1]")
        if not self.temperature > 0.0 or not math.isfinite(self.temperature):
            raise ValueError(f"kd.temperature={self.temperature!r}: expected a number > 0")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 0:
            raise ValueError(f"kd.topk={self.topk!r}: expected an integer >= 0")
        if self.divergence not in KD_LOSSES:
            raise ValueError(
                f"kd.divergence={self.divergence!r}: unknown KD loss; known: {sorted(KD_LOSSES)}"
            )
        if not self.mtp_loss_scaling_factor >= 0.0:
            raise ValueError(
                f"kd.mtp_loss_scaling_factor={self.mtp_loss_scaling_factor!r}: expected >= 0"
            )

    def depth_weight(self, d: int, num_depths: int) -> float:
        """w_0 = 1, w_d = lambda / D for d = 1..D (D = num_depths)."""
        return 1.0 if d == 0 else self.mtp_loss_scaling_factor / num_depths


@dataclass
class TeacherLogits:
    """Online teacher: its logits `[s, b, V/tp]`, sharded over TP exactly like the student's."""

    logits_sbv: torch.Tensor


@dataclass
class TeacherTopK:
    """Top-K teacher in the batch layout `[b, s, K]` (what `TeacherTopKReader.batch` returns).

    `ids_bsk`: global token ids, unique per position; `logprobs_bsk`: log q at `temperature`;
    `residual_bs`: log of the mass outside the top-K (-inf if none). None derives it as
    log(1 - sum exp(logprobs)), which is inexact when that mass is tiny.
    """

    ids_bsk: torch.Tensor
    logprobs_bsk: torch.Tensor
    residual_bs: torch.Tensor | None = None
    temperature: float = 1.0


@dataclass
class Documents:
    """Document of every input token and of every label, `[b, s]` each (packed sequences).

    A depth-d term at t counts only if `input_doc[t] == label_doc[t+d]`: the predicted token
    x[t+1+d] is in the document of x[t]. Build it with `documents_from_eod` (Megatron's
    GPTDataset: documents joined by EOD, the label after an EOD is the next document's),
    `documents_from_segments` (`kat_megatron.data.packing`: labels never leave their segment)
    or `documents_from_sample_ids` (ids of the whole sample `[b, s+1]`).
    """

    input_doc_bs: torch.Tensor
    label_doc_bs: torch.Tensor


def documents_from_eod(tokens_bs: torch.Tensor, eod_id: int) -> Documents:
    """Documents of EOD-joined data: an EOD ends its document; the token after it starts one."""
    ends = (tokens_bs == eod_id).long()
    after = torch.cumsum(ends, dim=1)  # documents finished up to and including x[t]
    return Documents(input_doc_bs=after - ends, label_doc_bs=after)


def documents_from_segments(segment_ids_bs: torch.Tensor) -> Documents:
    """Documents of packed rows whose label t is in the segment of input t (see data.packing)."""
    return Documents(input_doc_bs=segment_ids_bs, label_doc_bs=segment_ids_bs)


def documents_from_sample_ids(doc_ids_bs1: torch.Tensor) -> Documents:
    """Documents from ids of the whole sample `[b, s+1]` (inputs = [:-1], labels = [1:])."""
    return Documents(input_doc_bs=doc_ids_bs1[:, :-1], label_doc_bs=doc_ids_bs1[:, 1:])


def depth_valid_mask(
    loss_mask_bs: torch.Tensor, depth: int, documents: Documents | None = None
) -> torch.Tensor:
    """`[b, s - depth]` bool: depth-`depth` terms that count (see the module docstring)."""
    valid = loss_mask_bs[:, depth:] > 0
    if documents is not None:
        s = loss_mask_bs.shape[1]
        same = documents.input_doc_bs[:, : s - depth] == documents.label_doc_bs[:, depth:]
        valid = valid & same
    return valid


def _teacher_sb(teacher: Any, cfg: KDConfig, s: int, vocab_size: int | None, group: Any):
    """(logits_sbv or None, (ids_sbk, logprobs_sbk, residual_sb) or None), sequence-first."""
    if teacher is None:
        if cfg.alpha > 0:
            raise ValueError(f"kd.alpha={cfg.alpha} needs a teacher (alpha=0 is CE only)")
        return None, None
    if isinstance(teacher, TeacherLogits):
        if cfg.topk == 0:
            return teacher.logits_sbv.detach(), None
        t = teacher.logits_sbv.detach()
        flat = vocab_parallel_topk(
            t.reshape(-1, t.shape[-1]), cfg.topk, cfg.temperature, vocab_size, group
        )
        return None, tuple(x.reshape(s, -1, *x.shape[1:]) for x in flat)
    if not isinstance(teacher, TeacherTopK):
        raise TypeError(f"teacher must be TeacherLogits, TeacherTopK or None, not {type(teacher)}")
    k = teacher.ids_bsk.shape[-1]
    if cfg.topk not in (0, k):
        raise ValueError(f"kd.topk={cfg.topk} but the top-K teacher has K={k} (use 0 or {k})")
    if not math.isclose(teacher.temperature, cfg.temperature, rel_tol=1e-6):
        raise ValueError(
            f"teacher log-probs are at temperature {teacher.temperature}, "
            f"kd.temperature={cfg.temperature}: dump the teacher at the training temperature"
        )
    lq = teacher.logprobs_bsk.detach().float()
    res = teacher.residual_bs
    if res is None:
        res = torch.log1p(-lq.exp().sum(-1).clamp(max=1.0))
    return None, (teacher.ids_bsk.transpose(0, 1), lq.transpose(0, 1), res.float().t())


def _depth_terms(d, logits_sbv, labels_bs, valid_bs, t_logits, t_topk, fn, cfg, vocab_size, group):
    """Masked sums of CE, KD, top-1 agreements for depth d, and the valid count."""
    keep = logits_sbv.shape[0] - d
    z = logits_sbv[:keep].reshape(-1, logits_sbv.shape[-1])
    valid = valid_bs.t().reshape(-1)
    labels = torch.where(valid, labels_bs[:, d:].t().reshape(-1), 0)
    kw: dict[str, Any] = {"temperature": cfg.temperature, "vocab_size": vocab_size}
    kw.update(group=group, valid_n=valid)
    if t_logits is not None:
        kw["teacher_logits_nv"] = t_logits[d:].reshape(-1, t_logits.shape[-1])
    elif t_topk is not None:
        ids, lq, res = (x[d:].reshape(valid.shape[0], *x.shape[2:]) for x in t_topk)
        k = ids.shape[-1]
        filler = torch.full_like(lq, -math.log(k + 1))  # in-range stand-ins on masked rows
        kw["teacher_topk"] = (
            torch.where(valid[:, None], ids.long(), torch.arange(k, device=ids.device)),
            torch.where(valid[:, None], lq, filler),
            torch.where(valid, res, filler[:, 0]),
        )
    ce, kd, s_top1, t_top1 = fn(z, labels, **kw)
    vf = valid.to(ce.dtype)
    out = {
        "ce": (ce * vf).sum(),
        "kd": (kd * vf).sum(),
        "top1_teacher": ((s_top1 == t_top1) & valid).sum().to(ce.dtype),
        "acceptance": ((s_top1 == labels) & valid).sum().to(ce.dtype),
    }
    return out, vf.sum()


def mtp_kd_loss(
    student_logits_sbv: Sequence[torch.Tensor],
    labels_bs: torch.Tensor,
    loss_mask_bs: torch.Tensor,
    teacher: TeacherLogits | TeacherTopK | None,
    cfg: KDConfig,
    documents: Documents | None = None,
    vocab_size: int | None = None,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The MTP-KD loss: `(loss_sum, num_tokens, metrics)`; see the module docstring.

    `student_logits_sbv[d]` is head d's logits `[s, b, V/tp]` (0 = main head); `group` is the TP
    group (None = one rank); `vocab_size` drops padded vocabulary columns. Metrics (each a
    detached `[sum, count]`): `lm_loss` (depth-0 CE), `kd_loss`, and per depth d `kd_ce_d{d}`,
    `kd_kl_d{d}`, `kd_top1_teacher_d{d}`, `kd_acceptance_d{d}`.
    """
    num_depths = len(student_logits_sbv) - 1
    s = student_logits_sbv[0].shape[0]
    if not 0 <= num_depths < s:
        raise ValueError(f"need 1..{s} student heads for sequence length {s}")
    if labels_bs.shape != loss_mask_bs.shape or labels_bs.shape[1] != s:
        raise ValueError(
            f"labels {tuple(labels_bs.shape)}, loss mask "
            f"{tuple(loss_mask_bs.shape)}, logits sequence {s}"
        )
    t_logits, t_topk = _teacher_sb(teacher, cfg, s, vocab_size, group)
    fn = get_kd_loss(cfg.divergence)
    loss_sum, num_tokens, metrics = None, None, {}
    for d, logits in enumerate(student_logits_sbv):
        valid = depth_valid_mask(loss_mask_bs, d, documents)
        sums, count = _depth_terms(
            d, logits, labels_bs, valid, t_logits, t_topk, fn, cfg, vocab_size, group
        )
        term = (1 - cfg.alpha) * sums["ce"] + cfg.alpha * cfg.temperature**2 * sums["kd"]
        term = cfg.depth_weight(d, num_depths) * term
        loss_sum = term if loss_sum is None else loss_sum + term
        num_tokens = count if num_tokens is None else num_tokens
        for name, value in sums.items():
            key = {"ce": "kd_ce", "kd": "kd_kl"}.get(name, f"kd_{name}")
            metrics[f"{key}_d{d}"] = torch.stack([value.detach(), count])
    metrics["lm_loss"] = metrics["kd_ce_d0"]
    metrics["kd_loss"] = torch.stack([loss_sum.detach(), num_tokens])
    return loss_sum, num_tokens.to(torch.int64), metrics
