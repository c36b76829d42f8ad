"""THD packing of stage kd (`kd.packing`, `packed_seq.eod_rows`):

    pytest tests/training/test_kd_packing.py

- Layout: EOD-joined rows become one THD row; every EOD ends its document, every row's end
  ends one, a tail pads to the TP multiple; the heads come back in the rows' `[s, b]` layout.
- Parity (kd_worker.py `packed`, TP=1 and TP=2 with sequence parallelism): a student with two
  MTP depths run as a THD row against the same rows under a dense block-causal mask built in
  the worker from the EOD positions: logits of every head at every position that carries loss
  (its depth-d target in the same document), the KD loss and every gradient within 1e-5
  relative. Why that holds: each query sees the same keys in both (the mask zeroes the rest
  exactly) and RoPE is relative; what differs is fp32 summation order (per-document SDPA calls,
  rolled MTP inputs that differ only at positions without loss).
- Config: one-line errors for packing with the unfused attention, without document masking,
  and with an offline teacher's dump (computed with attention across documents).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

WORKER = str(Path(__file__).with_name("kd_worker.py"))
pytestmark = pytest.mark.timeout(600)


def test_eod_rows_layout():
    from kat_megatron.models.packed_seq import eod_rows, unpack_heads

    tokens = torch.tensor([[5, 0, 6, 7, 0, 8], [9, 9, 9, 9, 9, 0]])
    thd = eod_rows(tokens, eod_id=0, multiple=8)
    p = thd["packed_seq_params"]
    # row 0: [5 0] [6 7 0] [8]; row 1: [9 9 9 9 9 0]; tail 4 to 16
    assert p.cu_seqlens_q.tolist() == [0, 2, 5, 6, 12, 16] and p.max_seqlen_q == 6
    assert thd["tokens"].shape == (1, 16) and thd["tokens"][0, 12:].tolist() == [0] * 4
    assert thd["position_ids"][0].tolist() == [0, 1, 0, 1, 2, 0, *range(6), 0, 1, 2, 3]
    logits = torch.arange(16.0)[:, None, None].expand(16, 1, 3)
    back = unpack_heads(logits, thd["rows"])
    assert back.shape == (6, 2, 3) and back[:, 1, 0].tolist() == [6.0, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_kd_matches_dense_document_mask(tmp_path, run_ranks, tp):
    out = tmp_path / "packed.json"
    run_ranks([WORKER, "packed", out], nproc=tp, timeout=300)
    r = json.loads(out.read_text())
    print(f"KD packed vs dense document mask, TP={tp}: logits {r['logits_rel']:.1e}, "
          f"loss {r['loss_thd']:.6f} vs {r['loss_dense']:.6f}, grads {r['grad_rel']:.1e}")  # fmt: skip
    assert r["cu_seqlens"] == [0, 6, 7, 21, 32, 46, 64]
    assert r["heads_shape"] == [32, 2, 512 // tp]  # [s, b, V/tp]: tiny vocabulary 512
    assert r["logits_rel"] <= 1e-5
    assert r["loss_thd"] == pytest.approx(r["loss_dense"], rel=1e-5)
    assert r["grad_names"] and r["grad_rel"] <= 1e-5


def test_packing_config_errors(tmp_path):
    from kat_megatron.stages import load_run_config

    base = ["stage=kd", "model.preset=tiny-dense", "data.mock=true", "kd.alpha=0"]
    assert not load_run_config(None, base).kd.packing
    assert load_run_config(None, [*base, "kd.packing=true"]).kd.packing
    with pytest.raises(ValueError, match="kd.packing=true needs an attention"):
        load_run_config(None, [*base, "kd.packing=true", "model.attention=unfused"])
    with pytest.raises(ValueError, match="kd.mask_document_boundaries=true"):
        load_run_config(None, [*base, "kd.packing=true", "kd.mask_document_boundaries=false"])
    with pytest.raises(ValueError, match="kd.teacher.mode=offline"):
        load_run_config(None, [*base, "kd.packing=true", "kd.alpha=0.5",
                               "kd.teacher.mode=offline", f"kd.teacher.topk_dir={tmp_path}"])  # fmt: skip


def test_packed_kd_runs_across_layouts(tmp_path, tiny_corpus, kat, metrics):
    """`kat train` stage kd with kd.packing=true, an online teacher (the student's own initial
    checkpoint, so the KL starts at 0 and grows as the student moves), MTP depth 1: TP=2 (SP)
    reproduces TP=1 over 3 steps, the same run unpacked (attention across documents) differs,
    and PP=2 (THD activations [1, mbs * s] between the stages;
    no teacher: the online teacher refuses PP) gives TP=1's step-1 depth-0 loss. rel 1e-5: the
    same fp32 math in another reduction order (tests/training/parity_common.py)."""
    import yaml

    cfg = {
        "stage": "kd",
        "model": {"preset": "tiny-dense", "num_layers": 2, "mtp_num_layers": 1},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
        "data": {"paths": [str(tiny_corpus)], "seq_length": 64, "cache_dir": str(tmp_path / "c")},
        "kd": {"alpha": 0.5, "packing": True},
        "training": {"steps": 3, "micro_batch_size": 2, "global_batch_size": 4},
        "checkpoint": {"save": False},
        "logging": {"tensorboard": False},
    }
    config = tmp_path / "kd.yaml"
    config.write_text(yaml.safe_dump(cfg))
    init = tmp_path / "init"
    kat(["train", str(config), f"run.dir={init}", "training.steps=0", "kd.alpha=0",
         "checkpoint.save=true"])  # fmt: skip
    ckpt = init / "checkpoints" / "iter_0000000"
    online = [f"checkpoint.load={ckpt}", "kd.teacher.mode=online", f"kd.teacher.ckpt={ckpt}"]
    runs = {}
    for name, over, nproc in (
        ("tp1", online, 1),
        ("tp2", [*online, "parallel.tp=2"], 2),
        ("pp2", [f"checkpoint.load={ckpt}", "kd.alpha=0", "parallel.pp=2"], 2),
        ("unpacked", [*online, "kd.packing=false"], 1),
    ):
        kat(["train", str(config), f"run.dir={tmp_path / name}", *over], nproc=nproc)
        runs[name] = metrics(tmp_path / name)
    tp1, tp2, pp2 = runs["tp1"], runs["tp2"], runs["pp2"]
    assert len(tp1) == len(tp2) == 3 and tp1[0]["kd_kl_d0"] < 1e-6 < tp1[-1]["kd_kl_d0"]
    for a, b in zip(tp1, tp2, strict=True):
        for key in ("loss", "kd_loss", "kd_kl_d0", "kd_ce_d1"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert pp2[0]["loss"] == pytest.approx(tp1[0]["loss"], rel=1e-5)
    # Packing took effect: attention across documents (kd.packing=false) changes the loss.
    assert abs(runs["unpacked"][0]["loss"] / tp1[0]["loss"] - 1) > 1e-4
