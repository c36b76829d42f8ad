"""tiny-dense layouts reproduce the single-rank run: `pytest tests/training/test_parity_dense.py`.

TP=2 (sequence parallel), PP=2 with two virtual stages, DP=2 and TP=2 x PP=2, each 10 steps from
the one-rank run's initial weights: per-step losses within a relative 1e-5 of one rank (the setup
and why 1e-5: parity_common.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import parity_common as P  # noqa: E402

pytestmark = pytest.mark.timeout(1800)  # the module fixture runs 6 trainings
VARIANT = "tiny-dense"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus, kat, metrics):
    """{"tiny-dense": {"config", "model", "init", "base": losses, layout: losses, "dirs"}}"""
    root = tmp_path_factory.mktemp(VARIANT)
    return {VARIANT: P.train_variant(VARIANT, root, tiny_corpus, kat, metrics)}


@pytest.mark.parametrize("preset,layout", P.layout_cases(VARIANT))
def test_layout_matches_single_rank(runs, preset, layout):
    P.check_layout_matches_single_rank(runs[preset], preset, layout)
