"""tiny-moe layouts reproduce the single-rank run, and its checkpoints reshard on load:
`pytest tests/training/test_parity_moe.py`.

EP=2, DP=2 and TP=2 x PP=2, each 10 steps from the one-rank run's initial weights: per-step
losses within a relative 1e-5 of one rank (the setup and why 1e-5: parity_common.py). The same
runs feed the reshard-on-load test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kat_megatron.training.checkpoint_meta import latest_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
import parity_common as P  # noqa: E402

pytestmark = pytest.mark.timeout(1800)  # the module fixture runs 5 trainings
VARIANT = "tiny-moe"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus, kat, metrics):
    """{"tiny-moe": {"config", "model", "init", "base": losses, layout: losses, "dirs"}}"""
    root = tmp_path_factory.mktemp(VARIANT)
    return {VARIANT: P.train_variant(VARIANT, root, tiny_corpus, kat, metrics)}


@pytest.mark.parametrize("preset,layout", P.layout_cases(VARIANT))
def test_layout_matches_single_rank(runs, preset, layout):
    P.check_layout_matches_single_rank(runs[preset], preset, layout)


@pytest.mark.parametrize("preset", ["tiny-moe"])  # the dense case is a subset of its paths
def test_reshard_on_load(runs, preset, tmp_path, run_ranks):
    """TP2xPP2 checkpoint -> TP1 logits, and TP1 checkpoint -> TP2xPP2 logits, agree.

    The first is the TP2xPP2 run's final checkpoint, the second the initial weights (saved by
    one rank). Tolerance 1e-5 absolute on logits of order 1: the same fp32 reduction-order
    argument as for the losses (parity_common.py), for a single forward pass (measured: about
    3e-7).
    """
    res = runs[preset]
    config = res["config"]
    big = latest_checkpoint(res["dirs"]["tp2_pp2"] / "checkpoints")
    small = res["init"]
    tp2pp2 = [*res["model"], "parallel.tp=2", "parallel.pp=2"]
    a = P.dump_logits(run_ranks, config, big, tmp_path / "a.pt", 4, tp2pp2)
    b = P.dump_logits(run_ranks, config, big, tmp_path / "b.pt", 1, res["model"])
    assert torch.equal(a["tokens"], b["tokens"])
    diff = (a["logits"] - b["logits"]).abs().max().item()
    print(f"{preset}: TP2xPP2 ckpt, logits TP2xPP2 vs TP1: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    c = P.dump_logits(run_ranks, config, small, tmp_path / "c.pt", 1, res["model"])
    d = P.dump_logits(run_ranks, config, small, tmp_path / "d.pt", 4, tp2pp2)
    diff = (c["logits"] - d["logits"]).abs().max().item()
    print(f"{preset}: TP1 ckpt, logits TP1 vs TP2xPP2: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    # trained and initial weights differ: a loader that ignored the checkpoint would fail
    assert (a["logits"] - c["logits"]).abs().max().item() > 1e-3
