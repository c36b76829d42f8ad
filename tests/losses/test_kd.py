"""MTP-KD loss: config, registry, explicit formula, alignment, documents, top-K, online/offline.

    .venv/bin/python -m pytest tests/losses/test_kd.py -q

Tolerances: fp64 comparisons with an explicit per-token Python loop use 1e-10 (rounding only);
fp32 comparisons of two paths through different code (top-K vs full, offline vs online) use
1e-6 on per-token quantities (fp32 eps times log-sum-exps of order 5) and rtol 1e-6 on sums.
"""

from __future__ import annotations

import math

import pytest
import torch

from kat_megatron.data.teacher_topk import TeacherTopKMeta, TeacherTopKReader, TeacherTopKWriter
from kat_megatron.losses import kd
from kat_megatron.losses.kd import (
    KDConfig,
    TeacherLogits,
    TeacherTopK,
    depth_valid_mask,
    documents_from_eod,
    documents_from_sample_ids,
    documents_from_segments,
    mtp_kd_loss,
)
from kat_megatron.losses.vocab_parallel import vocab_parallel_topk


def test_config_validation():
    KDConfig(alpha=0.0, temperature=0.5, topk=8, divergence="reverse_kl")
    bad = [{"alpha": 1.5}, {"alpha": -0.1}, {"temperature": 0.0}, {"temperature": math.inf},
           {"topk": -1}, {"topk": 2.0}, {"topk": True}, {"mtp_loss_scaling_factor": -1.0}]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            KDConfig(**kwargs)
    with pytest.raises(ValueError, match=r"known: \['forward_kl', 'reverse_kl'"):
        KDConfig(divergence="jsd")
    assert KDConfig(mtp_loss_scaling_factor=0.3).depth_weight(2, num_depths=3) == pytest.approx(0.1)


def test_registry_lists_known_names_and_takes_new_losses():
    with pytest.raises(ValueError, match="unknown KD loss 'nope'; known: "):
        kd.get_kd_loss("nope")
    with pytest.raises(ValueError, match="already registered"):
        kd.register_kd_loss("forward_kl")(kd.forward_kl)
    try:
        kd.register_kd_loss("half_forward_kl")(
            lambda z, y, **kw: (lambda ce, kl, a, b: (ce, 0.5 * kl, a, b))(
                *kd.forward_kl(z, y, **kw)
            )
        )
        assert KDConfig(divergence="half_forward_kl").divergence == "half_forward_kl"
    finally:
        kd.KD_LOSSES.pop("half_forward_kl", None)


def _batch(s=8, b=2, v=11, depths=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    heads = [torch.randn(s, b, v, generator=g, dtype=dtype) * 2 for _ in range(depths + 1)]
    teacher = torch.randn(s, b, v, generator=g, dtype=dtype) * 2
    tokens = torch.randint(1, v, (b, s + 1), generator=g)
    tokens[0, 3] = tokens[1, 5] = 0  # EOD (id 0) inside both rows: packed documents
    loss_mask = torch.ones(b, s, dtype=dtype)
    loss_mask[1, -2:] = 0  # padding
    return heads, teacher, tokens, loss_mask


def _reference(heads, teacher, labels, loss_mask, is_eod, cfg):
    """A per-token loop over KAT_NOTES' formula, written independently of kd.py."""
    s, b, _ = teacher.shape
    depth = len(heads) - 1
    total, count0 = 0.0, 0
    for d, z in enumerate(heads):
        w = 1.0 if d == 0 else cfg.mtp_loss_scaling_factor / depth
        for bi in range(b):
            for t in range(s - d):
                if (
                    loss_mask[bi, t + d] == 0 or is_eod[bi, t : t + d + 1].any()
                ):  # x[t+1+d]: new doc
                    continue
                lp = torch.log_softmax(z[t, bi] / cfg.temperature, -1)
                lq = torch.log_softmax(teacher[t + d, bi] / cfg.temperature, -1)
                if cfg.divergence == "forward_kl":
                    kl = (lq.exp() * (lq - lp)).sum()
                else:
                    kl = (lp.exp() * (lp - lq)).sum()
                ce = -torch.log_softmax(z[t, bi], -1)[labels[bi, t + d]]
                a = cfg.alpha
                total = total + w * ((1 - a) * ce + a * cfg.temperature**2 * kl)
                count0 += d == 0
    return total, count0


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_matches_explicit_formula(divergence):
    heads, teacher, tokens, loss_mask = _batch()
    labels, docs = tokens[:, 1:], documents_from_eod(tokens[:, :-1], eod_id=0)
    cfg = KDConfig(alpha=0.3, temperature=2.0, divergence=divergence, mtp_loss_scaling_factor=0.5)
    mine = [h.clone().requires_grad_() for h in heads]
    loss, count, metrics = mtp_kd_loss(mine, labels, loss_mask, TeacherLogits(teacher), cfg, docs)
    loss.backward()
    ref_heads = [h.clone().requires_grad_() for h in heads]
    ref, ref_count = _reference(ref_heads, teacher, labels, loss_mask, tokens[:, :-1] == 0, cfg)
    ref.backward()
    assert int(count) == ref_count and count.dtype == torch.int64
    torch.testing.assert_close(loss, ref.detach(), atol=1e-10, rtol=0)
    for h, r in zip(mine, ref_heads, strict=True):
        torch.testing.assert_close(h.grad, r.grad, atol=1e-10, rtol=0)
    assert torch.equal(metrics["kd_loss"], torch.stack([loss.detach(), count.double()]))
    assert torch.equal(metrics["lm_loss"], metrics["kd_ce_d0"])


def test_alpha_zero_needs_no_teacher_and_is_cross_entropy():
    heads, _, tokens, loss_mask = _batch(depths=0)
    labels = tokens[:, 1:]
    loss, count, _ = mtp_kd_loss(heads, labels, loss_mask, None, KDConfig(alpha=0.0))
    ce = torch.nn.functional.cross_entropy(
        heads[0].transpose(0, 1).reshape(-1, 11), labels.reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss, (ce * loss_mask.reshape(-1)).sum(), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="needs a teacher"):
        mtp_kd_loss(heads, labels, loss_mask, None, KDConfig(alpha=0.5))


def _one_hot_logits(ids_sb: torch.Tensor, v: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(ids_sb, v).double() * 40.0


def test_alignment_depth_d_learns_token_t_plus_1_plus_d():
    """Teacher at position p is one-hot of x[p+1]; head d must then be pulled to x[t+1+d]."""
    s, b, v, depth = 8, 2, 32, 3
    x = torch.stack([torch.randperm(v)[: s + 1] for _ in range(b)])  # distinct tokens per row
    labels, loss_mask = x[:, 1:], torch.ones(b, s)
    teacher = TeacherLogits(_one_hot_logits(labels.t(), v))  # [s, b, v]: one-hot of x[p+1]
    cfg = KDConfig(alpha=1.0, temperature=1.0, mtp_loss_scaling_factor=1.0)
    heads = [
        torch.zeros(s, b, v, dtype=torch.float64, requires_grad=True) for _ in range(depth + 1)
    ]
    mtp_kd_loss(heads, labels, loss_mask, teacher, cfg)[0].backward()
    for d, h in enumerate(heads):
        pulled = h.grad.argmin(-1)[: s - d]  # the logit whose increase lowers the loss most
        assert torch.equal(pulled, x[:, 1 + d :].t()), f"depth {d}"
        assert torch.count_nonzero(h.grad[s - d :]) == 0  # no target beyond the sequence
    aligned = [_one_hot_logits(torch.roll(x[:, 1:], -d, dims=1).t(), v) for d in range(depth + 1)]
    _, _, m = mtp_kd_loss(aligned, labels, loss_mask, teacher, cfg)
    for d in range(depth + 1):
        n = m[f"kd_kl_d{d}"][1]
        assert n == b * (s - d) and m[f"kd_kl_d{d}"][0] < 1e-9
        assert m[f"kd_top1_teacher_d{d}"][0] == n and m[f"kd_acceptance_d{d}"][0] == n
    off_by_one = [aligned[0]] + aligned[:-1]  # head d predicting x[t+d]: wrong for d >= 1
    _, _, m = mtp_kd_loss(off_by_one, labels, loss_mask, teacher, cfg)
    assert m["kd_top1_teacher_d1"][0] == 0 and m["kd_kl_d1"][0] > 30 * m["kd_kl_d1"][1]


def test_depth_labels_and_mask_match_megatron_mtp_rolling():
    """Without boundaries, depth d's CE equals Megatron-Core's MTP CE (labels/mask rolled d times)."""
    from megatron.core.transformer.multi_token_prediction import roll_tensor

    heads, _, tokens, loss_mask = _batch(depths=2)
    labels = tokens[:, 1:]
    _, _, m = mtp_kd_loss(heads, labels, loss_mask, None, KDConfig(alpha=0.0))
    rolled_labels, rolled_mask = labels.clone(), loss_mask.clone()
    for d in range(1, 3):
        rolled_labels, _ = roll_tensor(rolled_labels, shifts=-1, dims=-1)
        rolled_mask, _ = roll_tensor(rolled_mask, shifts=-1, dims=-1)
        logits = heads[d].transpose(0, 1).reshape(-1, 11)
        ce = torch.nn.functional.cross_entropy(logits, rolled_labels.reshape(-1), reduction="none")
        want = torch.stack([(ce * rolled_mask.reshape(-1)).sum(), rolled_mask.sum()])
        torch.testing.assert_close(m[f"kd_ce_d{d}"], want, atol=1e-10, rtol=0)


def test_document_boundaries_and_padding_carry_no_loss():
    s = 10
    tokens = torch.tensor([[5, 6, 7, 0, 8, 9, 4, 0, 3, 2, 1]])  # EOD (0) at inputs 3 and 7
    loss_mask = torch.ones(1, s)
    loss_mask[0, -1] = 0  # the last label is padding
    docs = documents_from_eod(tokens[:, :-1], eod_id=0)
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])  # inputs + last label
    from_ids = documents_from_sample_ids(doc_ids)
    assert torch.equal(from_ids.input_doc_bs, docs.input_doc_bs)
    assert torch.equal(from_ids.label_doc_bs, docs.label_doc_bs)
    for d in range(3):
        # t counts iff x[t] and x[t+1+d] are in one document and label t+d is not padding
        want = [doc_ids[0, t] == doc_ids[0, t + 1 + d] and t + d < s - 1 for t in range(s - d)]
        assert depth_valid_mask(loss_mask, d, docs)[0].tolist() == want, f"depth {d}"
    heads = [torch.randn(s, 1, 12, requires_grad=True) for _ in range(3)]
    teacher = TeacherLogits(torch.randn(s, 1, 12))
    loss, count, m = mtp_kd_loss(heads, tokens[:, 1:], loss_mask, teacher, KDConfig(), docs)
    loss.backward()
    for d, h in enumerate(heads):
        valid = depth_valid_mask(loss_mask, d, docs)[0]
        zero_rows = torch.cat([~valid, torch.ones(d, dtype=torch.bool)])
        assert torch.count_nonzero(h.grad[zero_rows]) == 0 and h.grad[~zero_rows].abs().min() > 0
        assert m[f"kd_kl_d{d}"][1] == valid.sum()
    assert int(count) == depth_valid_mask(loss_mask, 0, docs).sum()


def test_packed_segments_match_megatron_packed_rolling():
    """data.packing rows (labels stay in their segment): depth d at t counts iff segment[t] ==
    segment[t+d], which is Megatron-Core's loss-mask roll with packed_seq_params."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.multi_token_prediction import roll_tensor

    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, -1, -1]])  # 3 documents, then padding
    loss_mask = (seg >= 0).float()
    cu = torch.tensor([0, 4, 7, 9, 11], dtype=torch.int32)  # the padding tail as its own slot
    params = PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_kv=cu, qkv_format="thd")
    rolled = loss_mask.clone()
    for d in range(1, 4):
        rolled, _ = roll_tensor(rolled, shifts=-1, dims=-1, packed_seq_params=params)
        ours = depth_valid_mask(loss_mask, d, documents_from_segments(seg))
        assert torch.equal(ours, rolled[:, : seg.shape[1] - d].bool()), f"depth {d}"
        assert not rolled[:, seg.shape[1] - d :].any()


def _fp32_batch():
    heads, teacher, tokens, loss_mask = _batch(v=40, dtype=torch.float32, seed=3)
    return heads, teacher, tokens[:, 1:], loss_mask, documents_from_eod(tokens[:, :-1], 0)


def _loss_and_grads(heads, labels, loss_mask, teacher, cfg, docs):
    heads = [h.clone().requires_grad_() for h in heads]
    loss, _, m = mtp_kd_loss(heads, labels, loss_mask, teacher, cfg, docs)
    loss.backward()
    return loss.detach(), [h.grad for h in heads], m


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_topk_equal_vocab_is_full_kd(divergence):
    heads, teacher, labels, loss_mask, docs = _fp32_batch()
    cfg = dict(alpha=0.7, temperature=1.5, divergence=divergence)
    full = _loss_and_grads(heads, labels, loss_mask, TeacherLogits(teacher), KDConfig(**cfg), docs)
    topk = _loss_and_grads(
        heads, labels, loss_mask, TeacherLogits(teacher), KDConfig(topk=40, **cfg), docs
    )
    torch.testing.assert_close(topk[0], full[0], atol=0, rtol=1e-6)
    for a, b in zip(topk[1], full[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_topk_below_vocab_matches_bucket_reference():
    """K < V: loss from an explicit K + 1 bucket formula (tokens outside the top-K pooled)."""
    heads, teacher, labels, loss_mask, docs = _fp32_batch()
    cfg = KDConfig(alpha=1.0, temperature=2.0, topk=5, mtp_loss_scaling_factor=0.4)
    loss, _, _ = mtp_kd_loss(heads, labels, loss_mask, TeacherLogits(teacher), cfg, docs)
    ref = 0.0
    for d, z in enumerate(heads):
        valid = depth_valid_mask(loss_mask, d, docs).t()  # [s-d, b]
        p, q = torch.softmax(z[: len(valid)] / 2, -1), torch.softmax(teacher[d:] / 2, -1)
        top = teacher[d:].topk(5, -1).indices
        pb = torch.cat([p.gather(-1, top), 1 - p.gather(-1, top).sum(-1, keepdim=True)], -1)
        qb = torch.cat([q.gather(-1, top), 1 - q.gather(-1, top).sum(-1, keepdim=True)], -1)
        kl = (qb * (qb.log() - pb.log())).sum(-1)
        ref = ref + (1.0 if d == 0 else 0.2) * 4.0 * (kl * valid).sum()
    torch.testing.assert_close(loss, ref, atol=0, rtol=1e-5)  # 1 - sum(top) rounds at 1e-7


def test_offline_teacher_matches_online(tmp_path):
    """Online full logits vs the same teacher's top-K (K = V) written, read back and used."""
    heads, teacher, labels, loss_mask, docs = _fp32_batch()
    s, b, v = teacher.shape
    tokens = torch.cat([labels[:, :1], labels], 1)[:, :s]  # any tokens: they key the hashes
    cfg = KDConfig(alpha=0.5, temperature=2.0, mtp_loss_scaling_factor=0.3)
    online = _loss_and_grads(heads, labels, loss_mask, TeacherLogits(teacher), cfg, docs)
    results = {}
    for k, dtype in [(v, "float32"), (8, "float16")]:
        ids, lq, res = vocab_parallel_topk(teacher.reshape(-1, v), k, temperature=2.0)
        meta = TeacherTopKMeta(s, k, v, 2.0, "tok-fp", "data-fp", logprob_dtype=dtype)
        with TeacherTopKWriter(tmp_path / f"dump{k}", meta, rows_per_shard=1) as w:
            w.write([10, 11], tokens, *(x.reshape(s, b, *x.shape[1:]).transpose(0, 1)
                                        for x in (ids, lq, res)))  # fmt: skip
        reader = TeacherTopKReader(tmp_path / f"dump{k}", tokenizer_fingerprint="tok-fp")
        batch = reader.batch([10, 11], tokens)
        results[k] = _loss_and_grads(
            heads, labels, loss_mask, TeacherTopK(**batch._asdict()), cfg, docs
        )
    torch.testing.assert_close(results[v][0], online[0], atol=0, rtol=1e-6)
    for a, b_ in zip(results[v][1], online[1], strict=True):
        torch.testing.assert_close(a, b_, atol=1e-6, rtol=0)
    k8 = _loss_and_grads(heads, labels, loss_mask, TeacherLogits(teacher), KDConfig(
        alpha=0.5, temperature=2.0, mtp_loss_scaling_factor=0.3, topk=8), docs)  # fmt: skip
    # fp16 log-probs are rounded by <= 2^-11 (5e-4) relative each; the errors partly cancel in
    # the loss (measured 1.7e-5 relative on this batch), 2e-4 leaves a 10x margin.
    torch.testing.assert_close(results[8][0], k8[0], atol=0, rtol=2e-4)


def test_offline_teacher_must_match_temperature_and_k():
    heads, teacher, labels, loss_mask, _ = _fp32_batch()
    ids, lq, res = vocab_parallel_topk(teacher.reshape(-1, 40), 4, temperature=1.0)
    shape = (teacher.shape[0], teacher.shape[1])
    t = TeacherTopK(*(x.reshape(*shape, *x.shape[1:]).transpose(0, 1) for x in (ids, lq, res)))
    with pytest.raises(ValueError, match="temperature"):
        mtp_kd_loss(heads, labels, loss_mask, t, KDConfig(temperature=2.0))
    with pytest.raises(ValueError, match="K=4"):
        mtp_kd_loss(heads, labels, loss_mask, t, KDConfig(topk=8))
    loss, _, _ = mtp_kd_loss(heads, labels, loss_mask, t, KDConfig(topk=4))
    no_res = TeacherTopK(t.ids_bsk, t.logprobs_bsk)  # residual derived as log(1 - sum)
    loss2, _, _ = mtp_kd_loss(heads, labels, loss_mask, no_res, KDConfig(topk=4))
    torch.testing.assert_close(loss2, loss, atol=0, rtol=1e-5)


def test_batch_first_logits_as_transposed_views():
    """`[b, s, V]` logits passed as `.transpose(0, 1)` views give the same loss and gradients."""
    heads, teacher, labels, loss_mask, docs = _fp32_batch()
    cfg = KDConfig(alpha=0.5, temperature=2.0)
    ref = _loss_and_grads(heads, labels, loss_mask, TeacherLogits(teacher), cfg, docs)
    bsv = [h.transpose(0, 1).contiguous().requires_grad_() for h in heads]
    t_view = TeacherLogits(teacher.transpose(0, 1).contiguous().transpose(0, 1))
    loss, _, _ = mtp_kd_loss([h.transpose(0, 1) for h in bsv], labels, loss_mask, t_view, cfg, docs)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref[0], atol=0, rtol=1e-6)
    for h, g in zip(bsv, ref[1], strict=True):
        torch.testing.assert_close(h.grad.transpose(0, 1), g, atol=1e-6, rtol=0)
