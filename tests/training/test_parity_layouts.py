"""Layouts the old rules refused reproduce the single-rank run:
`pytest tests/training/test_parity_layouts.py`.

- tiny-dense (4 layers) on PP=2 with uneven stages, `parallel.first_stage_layers=1` (the last
  stage builds the other 3: Megatron-Core's `num_layers_in_first_pipeline_stage`);
- tiny-dense at 5 layers on PP=2 with the embedding counted as a pipeline layer
  (`parallel.account_for_embedding_in_pipeline_split`: 6 slots, 3 + 3, so the first stage builds
  2 layers and the last 3, where no even split of 5 exists);
- tiny-moe on TP=2 x EP=2 with ETP=1 on two ranks: DP = 1, so EP does not divide DP x CP, but
  ETP x EP x PP = 2 divides the world (Megatron-Core 0.16.1's rule): the experts spread over
  the tensor-parallel ranks.

Each trains 10 steps from the one-rank run's initial weights on the same global batches; per-step
losses must match the one-rank run within a relative 1e-5 (why 1e-5: parity_common.py, fp32 on
CPU, only the reduction order differs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import parity_common as P  # noqa: E402

from kat_megatron.training.checkpoint_meta import latest_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(1200)

CASES = {
    "dense_pp2_first1": (
        ["model.preset=tiny-dense"],
        ["parallel.pp=2", "parallel.first_stage_layers=1"],
        "TP1 PP2(1,=) EP1 CP1 DP1",
    ),
    "dense_pp2_emb": (
        ["model.preset=tiny-dense", "model.num_layers=5"],
        ["parallel.pp=2", "parallel.account_for_embedding_in_pipeline_split=true"],
        "TP1 PP2(emb,=) EP1 CP1 DP1",
    ),
    "moe_tp2_ep2_etp1_dp1": (
        ["model.preset=tiny-moe"],
        ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"],
        "TP2 PP1 EP2 ETP1 CP1 DP1",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_single_rank(tmp_path, tiny_corpus, kat, metrics, case):
    model, layout, _ = CASES[case]
    config = P.write_config(tmp_path / "config.yaml", tiny_corpus, tmp_path / "base")
    kat(["train", str(config), *model, "training.steps=0", f"run.dir={tmp_path / 'init'}"])
    init = latest_checkpoint(tmp_path / "init" / "checkpoints")
    res = {}
    for name, nproc, overrides in (("base", 1, []), (case, 2, layout)):
        run_dir = tmp_path / name
        args = [f"run.dir={run_dir}", f"checkpoint.load={init}", *model, *overrides]
        proc = kat(["train", str(config), *args], nproc=nproc)
        res[name] = [r["loss"] for r in metrics(run_dir)]
    P.check_layout_matches_single_rank(res, model[0], case)
    # Rank 0 holds exactly what the planner lists for its stage (runtime.py's start-up check):
    # with the uneven split that is the embedding and one layer, not two.
    out = proc.stdout + proc.stderr
    line = next(x for x in out.splitlines() if "memory (rank 0" in x)
    print(line)
    assert "static estimate exact" in line
    assert CASES[case][2] in line
