"""SDPA core attention (`model.attention=sdpa`) against the unfused reference and torch formulas:

    pytest tests/models/test_attention.py

Model level (`attention_worker.py`, one launch at TP=1 and one at TP=2 with sequence
parallelism): tiny-dense, tiny-dense with GQA (4 heads, 2 groups, 16-wide), tiny-moe, a padding
mask with fully masked rows, selective recompute of the core attention, a packed row of two
documents (PackedSeqParams, thd) and greedy decoding through the rollout engine (KV cache).
Module level (this process, no process group): decode alignment (sq < sk), fully masked rows,
padded cu_seqlens, dropout, and the configuration errors.

Tolerances. Logits, loss and gradients: 1e-6 relative (max |sdpa - unfused| / max |unfused| per
tensor), the issue's bound. Both sides are fp32 on CPU and compute the same function; they differ
only in summation order (torch's flash kernel accumulates the softmax block by block, online,
where the unfused path materialises the scores and normalises once): a few fp32 epsilons (1.2e-7)
per op, measured <= 7.3e-7 on gradients (tiny-moe) and <= 3.7e-7 on logits. A wrong mask, head
mapping or scale moves them by 1e-2 or more. Module-level checks against an explicit fp32 torch
formula (softmax of the masked scores): 1e-6 absolute on outputs of order 1. Decode: greedy tokens exactly (the premise,
checked, is that no greedy step is within 1e-3 of a tie), log-probs within 1e-5 absolute
(log-probs of order 10 with fp32 rounding of 1e-6, measured <= 4.8e-6).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from kat_megatron.models.attention import SDPAttention

sys.path.insert(0, str(Path(__file__).parent))
import attention_worker as W  # noqa: E402

pytestmark = pytest.mark.timeout(300)
REL_TOL = 1e-6
MODULE_TOL = 1e-6
LOGPROB_TOL = 1e-5
MARGIN = 1e-3


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2_sp"])
def layout(request, tmp_path_factory, run_ranks) -> dict:
    """attention_worker.py's results (rank 0; every figure is the max over the TP ranks)."""
    out = tmp_path_factory.mktemp(f"attention_tp{request.param}")
    run_ranks([W.__file__, out], nproc=request.param, timeout=240)
    return torch.load(out / "rank0.pt", weights_only=False)


@pytest.mark.parametrize("case", ["dense", "gqa", "moe", "padding", "recompute"])
def test_sdpa_matches_unfused(layout, case):
    got = layout[case]
    print(f"tp{layout['tp']} {case}: {got}")
    assert layout["sp"] == (layout["tp"] > 1)
    if case == "recompute":
        assert got["checkpointed"]  # SelfAttention ran the core attention under checkpoint
    for what in ("logits", "loss", "grads"):
        assert got[what] <= REL_TOL, (case, what, got)


def test_packed_documents_equal_each_document_alone(layout):
    got = layout["packed"]
    print(f"tp{layout['tp']} packed: {got}")
    for what in ("vs_alone", "vs_dense_mask", "loss", "grads"):
        assert got[what] <= REL_TOL, (what, got)


def test_engine_greedy_decode_identical(layout):
    got = layout["decode"]
    assert got["min_margin"] > MARGIN
    for (ids_a, lp_a), (ids_b, lp_b) in zip(got["sdpa"], got["unfused"], strict=True):
        assert len(ids_a) == W.MAX_NEW and ids_a == ids_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), atol=LOGPROB_TOL,
                                   rtol=0)  # fmt: skip


# -------------------------------------------------------------------------- module level
def _config(**kw) -> TransformerConfig:
    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                kv_channels=16, attention_dropout=0.0, use_cpu_initialization=True)  # fmt: skip
    return TransformerConfig(**{**base, **kw})


def _module(config=None, mask_type=AttnMaskType.causal) -> SDPAttention:
    tp = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    return SDPAttention(config or _config(), 1, mask_type, "self",
                        pg_collection=SimpleNamespace(tp=tp))  # fmt: skip


def _qkv(sq: int, sk: int, b: int = 2, heads: int = 4, groups: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, heads, 16, generator=g)
    k, v = (torch.randn(sk, b, groups, 16, generator=g) for _ in range(2))
    return q, k, v


def _reference(q, k, v, allowed: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hn) where allowed) v, query head i on group i // (np / ng)."""
    rep = q.size(2) // k.size(2)
    k, v = (x.repeat_interleave(rep, dim=2) for x in (k, v))
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / q.size(-1) ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(q.size(0), q.size(1), -1)


@pytest.mark.parametrize("sq,sk", [(8, 8), (1, 8), (3, 8)])
def test_causal_alignment_without_mask(sq, sk):
    """sq == sk: causal; sq == 1: every cached key; 1 < sq < sk: the queries are the last sq
    positions (bottom-right aligned), not torch's top-left `is_causal`."""
    q, k, v = _qkv(sq, sk)
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    got = _module()(q, k, v, None)
    torch.testing.assert_close(got, _reference(q, k, v, allowed), atol=MODULE_TOL, rtol=0)
    no_mask = _module(mask_type=AttnMaskType.no_mask)(q, k, v, None)
    torch.testing.assert_close(no_mask, _reference(q, k, v, None), atol=MODULE_TOL, rtol=0)


def test_mask_tensor_and_fully_masked_rows():
    """A bool mask (True = masked) replaces the causal rule; a row masked everywhere gets the
    unfused path's uniform softmax (the mean of the values) and passes no gradient to q."""
    q, k, v = _qkv(6, 6)
    q.requires_grad_(True)
    mask = torch.ones(6, 6, dtype=torch.bool).tril().logical_not().expand(2, 1, 6, 6).clone()
    mask[0, 0, :2] = True  # batch row 0: queries 0 and 1 see nothing
    got = _module()(q, k, v, mask)
    allowed = ~mask.expand(2, 4, 6, 6)
    ref = _reference(q, k, v, allowed | allowed.logical_not().all(-1, keepdim=True))
    mean_v = v.mean(0).repeat_interleave(2, dim=1).reshape(2, -1)  # [b, np * hn]
    ref[:2, 0] = mean_v[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=MODULE_TOL, rtol=0)
    got.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[:2, 0].abs().max() == 0
    with pytest.raises(ValueError, match="must be bool"):
        _module()(q, k, v, mask.float())


def test_padded_cu_seqlens_keep_documents_apart():
    """thd with cu_seqlens_q_padded: document i starts at its padded offset; the padding after
    it gets output 0; each document equals a causal pass over it alone."""
    lens, starts, t = [5, 3], [0, 8], 12  # [doc 0 | 3 pad | doc 1 | 1 pad]
    q, k, v = (x[:, 0] for x in _qkv(t, t, b=1))
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    padded = torch.tensor([0, 8, 12], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded)  # fmt: skip
    got = _module()(q, k, v, None, packed_seq_params=params)
    assert got.shape == (t, 64)
    for s0, n in zip(starts, lens):
        doc = [x[s0 : s0 + n, None] for x in (q, k, v)]
        ref = _reference(*doc, torch.ones(n, n, dtype=torch.bool).tril())[:, 0]
        torch.testing.assert_close(got[s0 : s0 + n], ref, atol=MODULE_TOL, rtol=0)
    assert got[5:8].abs().max() == 0 and got[11:].abs().max() == 0
    with pytest.raises(ValueError, match="not both"):
        _module()(q, k, v, torch.zeros(1, 1, t, t, dtype=torch.bool), packed_seq_params=params)


def test_dropout_in_training_only(monkeypatch):
    from contextlib import nullcontext

    from kat_megatron.models import attention

    tracker = SimpleNamespace(fork=nullcontext)  # no TP RNG tracker without a process group
    monkeypatch.setattr(attention.tensor_parallel, "get_cuda_rng_tracker", lambda: tracker)
    q, k, v = _qkv(8, 8)
    module = _module(_config(attention_dropout=0.5))
    ref = _module()(q, k, v, None)
    module.eval()
    torch.testing.assert_close(module(q, k, v, None), ref, atol=0, rtol=0)
    module.train()
    torch.manual_seed(0)
    dropped = module(q, k, v, None)
    assert (dropped - ref).abs().max() > 1e-2


def test_configuration_errors():
    from kat_megatron.config.schema import ModelConfig

    with pytest.raises(ValueError, match=r"model.attention='flash': expected one of \['sdpa'"):
        ModelConfig(attention="flash")
    with pytest.raises(ValueError, match="context parallelism needs Transformer Engine"):
        _module(_config(context_parallel_size=2))
    with pytest.raises(ValueError, match="model.attention=unfused"):
        _module(_config(softmax_type="off-by-one"))
