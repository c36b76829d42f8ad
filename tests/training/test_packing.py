"""THD packing of stage sft (`data.packing`, kat_megatron/models/packed_seq.py):

    pytest tests/training/test_packing.py

- Layout: SFT rows of a micro-batch become one THD row whose documents are the rows' documents,
  each row's padding tail a dummy document, and a tail to the TP multiple; positions restart.
- Parity: 10 steps of `kat train` stage sft (tiny-dense, micro-batch 2, global batch 4, fp32)
  with `data.packing=true` (THD `PackedSeqParams` through the local SDPA attention) and with
  `data.packing=false` (today's dense [b, 1, s, s] block-causal mask) give per-step losses and
  grad norms within 1e-6 absolute. Why that holds: the same weights, tokens and loss positions;
  each document attends to the same keys in both (the dense mask zeroes the rest exactly);
  RoPE is relative, and the packed rows' per-document positions only shift the absolute angle.
  What is left is fp32 rounding (summation order of one SDPA call per document vs one masked
  call per row, RoPE angles at other absolute positions): measured 4.8e-7 in the loss (one fp32
  ulp at a loss of ~6) and 2.9e-7 in the grad norm.
- 2 ranks: TP=2 (sequence parallel) and PP=2 with packing reproduce the one-rank dense-mask
  run from one initial checkpoint within relative 1e-5 (the bound and argument of
  tests/training/parity_common.py: TP/PP change reduction order only).
- Config: packing with `model.attention=unfused` (which ignores `PackedSeqParams`) and dense
  masks with Transformer Engine are one-line errors; the default follows the attention.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(900)


def _sft():
    """tests/training/test_sft.py as a module (its SFT config and chat writer)."""
    spec = importlib.util.spec_from_file_location(
        "kat_test_sft", Path(__file__).with_name("test_sft.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_rows_layout():
    from kat_megatron.models.packed_seq import pack_rows

    b, s = 2, 8
    batch = {
        "tokens": torch.arange(b * s).reshape(b, s),
        "labels": torch.arange(b * s).reshape(b, s) + 100,
        "loss_mask": torch.ones(b, s),
    }
    out = pack_rows(batch, [[0, 3, 6], [0, 8]], multiple=6)
    p = out["packed_seq_params"]
    assert out["tokens"].shape == (1, 18) and p.qkv_format == "thd"
    # row 0: docs 3, 3, padding tail 2; row 1: one doc of 8; tail to 18 (multiple of 6): 2
    assert p.cu_seqlens_q.tolist() == [0, 3, 6, 8, 16, 18] and p.max_seqlen_q == 8
    assert p.cu_seqlens_q.dtype == torch.int32 and p.cu_seqlens_kv is p.cu_seqlens_q
    assert out["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, *range(8), 0, 1]
    assert out["tokens"][0, :16].tolist() == list(range(16))
    assert out["loss_mask"][0, 16:].sum() == 0 and out["labels"][0, 16:].tolist() == [0, 0]


def test_packing_config():
    from kat_megatron.stages import load_run_config

    base = ["stage=sft", "model.preset=tiny-dense"]
    assert load_run_config(None, base).data.packing is None
    with pytest.raises(ValueError, match="data.packing=true needs an attention"):
        load_run_config(None, [*base, "model.attention=unfused", "data.packing=true"])
    with pytest.raises(ValueError, match="takes packed rows as THD only"):
        load_run_config(None, [*base, "model.backend=te", "data.packing=false"])
    with pytest.raises(ValueError, match="rl.packing=true needs an attention"):
        load_run_config(
            None, ["stage=rl", "rl.prompts=p.jsonl", "model.attention=unfused", "rl.packing=true"]
        )

    from kat_megatron.config import ModelConfig
    from kat_megatron.models.packed_seq import packing_enabled

    assert packing_enabled(None, ModelConfig(backend="local"), "data.packing")
    assert not packing_enabled(None, ModelConfig(backend="local", attention="unfused"), "x")
    assert not packing_enabled(False, ModelConfig(backend="local"), "x")


def test_packed_sft_matches_dense_mask(tmp_path, kat, metrics):
    config, load = _sft().sft_config_and_init(tmp_path, kat, "tiny-dense", chats=96, seed=2,
                                              steps=10)  # fmt: skip
    runs = {}
    for name, over in (("dense", ["data.packing=false"]), ("packed", ["data.packing=true"])):
        kat(["train", str(config), f"run.dir={tmp_path / name}", load, *over])
        runs[name] = metrics(tmp_path / name)
    dense, packed = runs["dense"], runs["packed"]
    assert len(dense) == len(packed) == 10 and dense[-1]["loss"] < dense[0]["loss"]
    loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(dense, packed))
    norm = max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(dense, packed))
    print(f"SFT packed vs dense mask, 10 steps: max |loss diff| {loss:.2e}, grad norm {norm:.2e}")
    assert loss <= 1e-6 and norm <= 1e-6, (dense, packed)

    for layout in ("parallel.tp=2", "parallel.pp=2"):
        run = tmp_path / layout.replace("=", "")
        kat(["train", str(config), f"run.dir={run}", load, "data.packing=true", layout], nproc=2)
        other = metrics(run)
        rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(dense, other))
        print(f"SFT packed {layout} vs one-rank dense mask: max relative loss diff {rel:.2e}")
        assert len(other) == 10 and rel <= 1e-5, (dense, other)
