"""`rl.packing` (verl's remove-padding): a micro-batch's rollouts as one THD row.

    pytest tests/rl/test_packing.py

- Layout: `collate_rollouts(packed=True)` concatenates the rows' real positions (prompt +
  response - 1 each) without padding, positions restarting per rollout, a dummy padding
  document to the TP multiple; the loss tensors stay in the padded `[b, s]` layout and
  `unpack` puts per-token model outputs back into it (differentiably).
- Parity (tests/rl/packing_worker.py): two optimizer steps of the trainer's path on mixed-length
  rollouts (sequence-mean aggregation, entropy bonus, KL, truncated IS, old log-probs) give the
  same loss and grad norm packed as padded within 1e-6 absolute, and the same forward-only
  response log-probs within 1e-6, at one rank and at TP=2 (sequence parallel). Why 1e-6: the
  same weights, tokens and loss inputs; every rollout attends to the same keys (the padded row's
  causal mask never reaches its padding); only fp32 summation order differs (matmuls over
  [1, t] instead of [b, s] rows, one SDPA call per rollout), ~1e-7. Measured: see the printout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kat_megatron.rl.batching import RolloutSample, collate_rollouts, unpack

pytestmark = pytest.mark.timeout(600)
WORKER = Path(__file__).with_name("packing_worker.py")


def test_packed_layout_and_unpack():
    s = RolloutSample([5, 6, 7], [8, 9], [0.5, -1.0], [-0.1, -0.2])
    short = RolloutSample([1], [2], [2.0], [-0.5])
    padded = collate_rollouts([s, short, None], pad_id=0, pad_multiple=8)
    b = collate_rollouts([s, short, None], pad_id=0, pad_multiple=8, packed=True)
    assert b["tokens"].tolist() == [[5, 6, 7, 8, 1, 0, 0, 0]]
    assert b["labels"].tolist() == [[6, 7, 8, 9, 2, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 0, 1, 2]]
    p = b["packed_seq_params"]
    assert p.qkv_format == "thd" and p.cu_seqlens_q.tolist() == [0, 4, 5, 8]
    assert p.max_seqlen_q == 4 and p.cu_seqlens_kv is p.cu_seqlens_q
    for key in ("loss_mask", "advantages", "rollout_logprobs"):  # loss inputs: padded layout
        assert torch.equal(b[key], padded[key])
    values = torch.arange(8.0, requires_grad=True)
    out = unpack(values[None], b)
    assert out.tolist() == [[0, 1, 2, 3, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0], [0] * 8]
    out.sum().backward()
    assert values.grad.tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert unpack(padded["loss_mask"], padded) is padded["loss_mask"]  # padded: unchanged


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_matches_padded(tmp_path, run_ranks, tp):
    res = {}
    for variant in ("padded", "packed"):
        out = tmp_path / f"{variant}.json"
        run_ranks([WORKER, str(tp), variant, str(out)], nproc=tp, timeout=300)
        res[variant] = json.loads(out.read_text())
    padded, packed = res["padded"], res["packed"]
    assert packed["rows"][0][0] == 1 and padded["rows"][0][0] == 4
    assert sum(r[1] for r in packed["rows"]) < sum(r[0] * r[1] for r in padded["rows"])
    loss = max(abs(a - b) for a, b in zip(padded["loss"], packed["loss"]))
    norm = max(abs(a - b) for a, b in zip(padded["grad_norm"], packed["grad_norm"]))
    logp = max(abs(a - b) for a, b in zip(padded["logprobs"], packed["logprobs"]))
    print(f"RL TP={tp} packed vs padded: max |loss diff| {loss:.2e}, grad norm {norm:.2e}, "
          f"log-probs {logp:.2e} (loss {padded['loss']}, grad norm {padded['grad_norm']})")  # fmt: skip
    assert len(padded["logprobs"]) == len(packed["logprobs"]) > 100
    assert loss <= 1e-6 and norm <= 1e-6 and logp <= 1e-6
