"""Stage pretrain with attention per document (`data.packing=true`, `training/datasets.py:
EodDocuments`): `pytest tests/training/test_pretrain_packing.py`.

- Boundaries against Megatron-Core's own per-document pretraining: the same GPT dataset built
  with `reset_attention_mask=True, reset_position_ids=True` (Megatron-LM's flags for attention
  that stops at EOD) gives, for every sample, a dense [s, s] mask and positions; the THD row
  that `EodDocuments` + `training.batches.collate` make must have exactly that block-causal
  structure (documents = the mask's blocks) and those positions, and the same tokens, labels
  and loss mask as the unpacked sample.
- `kat train` runs it (one rank, 3 steps): finite losses that differ from the unpacked run's
  from step 1 on (the attention changed, the data did not), and `model.attention=unfused` with
  `data.packing=true` is a one-line error naming the field.
The THD path through the model itself is checked against dense document masks in
test_packing.py (SFT) and test_kd_packing.py (KD).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytestmark = pytest.mark.timeout(600)


def _blocks(cu: list[int], s: int) -> torch.Tensor:
    """[s, s] True = masked: causal within each document [cu[i], cu[i+1])."""
    allowed = torch.zeros(s, s, dtype=torch.bool)
    for a, z in zip(cu[:-1], cu[1:]):
        allowed[a:z, a:z] = torch.ones(z - a, z - a, dtype=torch.bool).tril()
    return ~allowed


def test_eod_documents_match_megatron_reset_masks(tmp_path, tiny_corpus):
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from kat_megatron.config.schema import DataConfig
    from kat_megatron.data.gpt_data import build_gpt_datasets
    from kat_megatron.training.batches import collate
    from kat_megatron.training.datasets import EodDocuments

    s = 64
    data = DataConfig(paths=[str(tiny_corpus)], seq_length=s, split="100,0,0")
    train, _, _ = build_gpt_datasets(
        data, s, 3, (40, None, None), cache_dir=tmp_path, create_attention_mask=False
    )
    ref_cfg = dataclasses.replace(
        train.config, reset_attention_mask=True, reset_position_ids=True,
        create_attention_mask=True,
    )  # fmt: skip
    ref = GPTDataset(
        train.dataset, train.dataset_path, train.indices, train.num_samples, train.index_split,
        ref_cfg,
    )  # fmt: skip
    packed = EodDocuments(train, train.config.tokenizer.eod)
    assert packed.thd and len(packed) == len(train)
    multi = 0
    for i in range(len(train)):
        sample, theirs = packed[i], ref[i]
        cu = sample["cu_seqlens"]
        multi += len(cu) > 2
        assert cu[0] == 0 and cu[-1] == s and all(b > a for a, b in zip(cu[:-1], cu[1:]))
        assert torch.equal(_blocks(cu, s), theirs["attention_mask"][0].bool()), i
        row = collate([sample], multiple=1)
        assert row["packed_seq_params"].cu_seqlens_q.tolist() == cu
        assert row["position_ids"][0].tolist() == theirs["position_ids"].tolist(), i
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(row[key][0].float(), torch.as_tensor(theirs[key]).float()), key
    assert multi > len(train) // 2  # most 64-token samples hold a document boundary


def test_packed_pretrain_trains(tmp_path, tiny_corpus, kat, metrics):
    import yaml

    from kat_megatron.stages import load_run_config

    base = ["model.preset=tiny-dense", "data.mock=true"]
    assert not load_run_config(None, base).data.packing
    with pytest.raises(ValueError, match="data.packing=true needs an attention"):
        load_run_config(None, [*base, "data.packing=true", "model.attention=unfused"])

    cfg = {
        "stage": "pretrain",
        "model": {"preset": "tiny-dense", "num_layers": 2},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
        "data": {"paths": [str(tiny_corpus)], "seq_length": 64, "cache_dir": str(tmp_path / "c")},
        "training": {"steps": 3, "micro_batch_size": 2, "global_batch_size": 4},
        "checkpoint": {"save": False},
        "logging": {"interval": 1, "tensorboard": False},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    losses = {}
    for packing in ("true", "false"):
        run = tmp_path / f"packing_{packing}"
        kat(["train", str(config), f"run.dir={run}", f"data.packing={packing}"])
        losses[packing] = [r["loss"] for r in metrics(run)]
    print("pretrain losses, packed vs across documents:", losses)
    assert len(losses["true"]) == 3 and all(math.isfinite(x) for x in losses["true"])
    # same weights and tokens, other attention: the step-1 losses differ beyond rounding
    assert abs(losses["true"][0] - losses["false"][0]) > 1e-4
