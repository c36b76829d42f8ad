"""Unit tests of the sampler order, the LM loss reduction and metrics.jsonl on resume."""

from __future__ import annotations

import json

import pytest
import torch

from kat_megatron.losses.lm import masked_token_loss
from kat_megatron.training.batches import microbatch_indices
from kat_megatron.training.metrics import _truncate_after


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_global_batch_is_layout_independent(dp):
    """The union of all ranks' micro-batches is [consumed, consumed + global_batch)."""
    consumed, gbs, mbs = 40, 8, 2
    seen = [
        i for r in range(dp) for mb in microbatch_indices(consumed, gbs, mbs, r, dp) for i in mb
    ]
    assert sorted(seen) == list(range(consumed, consumed + gbs))
    assert len(seen) == len(set(seen))


def test_megatron_sampler_order():
    # Megatron-LM's MegatronPretrainingSampler: rank r takes [r*mbs, (r+1)*mbs) of each mbs*dp block
    assert microbatch_indices(0, 8, 2, 1, 2) == [[2, 3], [6, 7]]


def test_batch_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match="global_batch_size=6 is not a multiple"):
        microbatch_indices(0, 6, 2, 0, 2)


def test_masked_token_loss_against_explicit_formula():
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(3, 5, generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    total, count, metrics = masked_token_loss(loss, mask)
    expected = sum(loss[i, j].item() for i in range(3) for j in range(5) if mask[i, j] > 0)
    assert total.item() == pytest.approx(expected, rel=1e-6)  # fp32 summation order
    assert count.item() == int(mask.sum().item())
    assert metrics["lm_loss"].tolist() == pytest.approx([expected, mask.sum().item()], rel=1e-6)


def test_masked_token_loss_shape_mismatch():
    with pytest.raises(ValueError, match="loss"):
        masked_token_loss(torch.zeros(2, 3), torch.zeros(3, 2))


def test_metrics_truncated_to_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8))
        + '{"step": 8, "lo'
    )  # a line torn by a crash
    _truncate_after(path, 5)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
