"""`training.recompute`: recomputing activations changes memory, not numbers.

Three steps of tiny-moe at TP=2 with recompute none, selective and full give bitwise-equal
losses and gradient norms (the same kernels run in the same order; only when they run differs).
"""

from __future__ import annotations

import pytest
import yaml

pytestmark = pytest.mark.timeout(900)


def test_recompute_modes_match(tmp_path, tiny_corpus, kat, metrics):
    cfg = {
        "model": {"preset": "tiny-moe"},
        "parallel": {"tp": 2},
        "training": {"steps": 3, "micro_batch_size": 2, "global_batch_size": 4},
        "data": {"paths": [str(tiny_corpus)], "seq_length": 32,
                 "cache_dir": str(tiny_corpus.parent / "cache")},
        "checkpoint": {"save": False},
        "logging": {"tensorboard": False},
    }  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    rows = {}
    for mode in ("none", "selective", "full"):
        run = tmp_path / mode
        kat(["train", str(config), f"run.dir={run}", f"training.recompute={mode}"], nproc=2)
        rows[mode] = [(r["loss"], r["grad_norm"]) for r in metrics(run)]
    assert len(rows["none"]) == 3
    assert rows["selective"] == rows["none"]
    assert rows["full"] == rows["none"]
