"""Static memory estimate vs real ranks: `pytest tests/planning/test_static_memory.py`.

One launch of four gloo ranks (`measure_static.py`) builds every case in `CASES` through
`Trainer` (Megatron-Core model, DDP, distributed or replicated optimizer), takes a step and
records what each rank holds. The planner's `static_memory` for that rank (its pipeline rank and
its positions in the DP x CP and expert-DP groups) must match byte for byte: parameters (the
padded param buffer under the distributed optimizer), fp32 (or, with
`optimizer.grad_reduce_dtype=bf16`, bf16) gradient buffers (padded to
lcm(DP, 128) per bucket, parameters aligned to 64 elements), fp32 main copies and Adam moments
(each DP rank's shard, padding excluded). Tolerance zero: these are allocation sizes, not floats.
The planner's parameter inventory must also list each rank's `named_parameters()` exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from measure_static import BASE, CASES  # noqa: E402

from kat_megatron.config import load_config  # noqa: E402
from kat_megatron.planning.inventory import expand, stage_inventory  # noqa: E402
from kat_megatron.planning.layout import Layout  # noqa: E402
from kat_megatron.planning.static import GRAD_BYTES, static_memory  # noqa: E402

RANKS = 4


@pytest.fixture(scope="module")
def measured(tmp_path_factory, run_ranks) -> dict[str, list[dict]]:
    """{case: [rank 0 row, ..., rank 3 row]} from one 4-rank launch."""
    out = tmp_path_factory.mktemp("static")
    worker = Path(__file__).with_name("measure_static.py")
    run_ranks([worker, "--out", out, *CASES], nproc=RANKS, timeout=600)
    return {
        case: [json.loads((out / f"{case}.rank{r}.json").read_text()) for r in range(RANKS)]
        for case in CASES
    }


def _estimate(row: dict):
    cfg = load_config(None, [*BASE, *row["overrides"]])
    layout = Layout.from_parallel(cfg.parallel, row["world_size"])
    est = static_memory(
        cfg.model,
        layout,
        row["pp_rank"],
        param_bytes=2 if cfg.training.precision == "bf16" else 4,
        distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        dp_rank=row["dp_rank"],
        expert_dp_rank=row["expert_dp_rank"],
        grad_bytes=GRAD_BYTES[cfg.optimizer.grad_reduce_dtype],
    )
    return cfg, layout, est


@pytest.mark.parametrize("case", list(CASES))
def test_static_bytes_equal_allocated(measured, case):
    for row in measured[case]:
        _, layout, est = _estimate(row)
        got = {k: row[k] for k in ("params_bytes", "grad_bytes", "main_param_bytes")}
        got["moment_bytes"] = row["moment_bytes"]
        want = {
            "params_bytes": est.params_bytes,
            "grad_bytes": est.grad_bytes,
            "main_param_bytes": est.main_param_bytes,
            "moment_bytes": est.moment_bytes,
        }
        print(f"{case} {layout.label()} pp{row['pp_rank']} dp{row['dp_rank']}: {got}")
        assert got == want, (case, row["pp_rank"], row["dp_rank"])


@pytest.mark.parametrize("case", list(CASES))
def test_inventory_lists_named_parameters(measured, case):
    for row in measured[case]:
        cfg, layout, _ = _estimate(row)
        chunks = stage_inventory(cfg.model, layout, row["pp_rank"])
        mine = [
            [[p.name, p.numel, p.expert, p.shared_embedding] for p in expand(c)] for c in chunks
        ]
        assert mine == row["named_params"]


def test_cases_exercise_padding_and_sharding(measured):
    """The exact match means something: DP ranks of one stage own different amounts of optimizer
    state (padding sits in the last shard), and padded buffers exceed the parameter count."""
    rows = measured["dense_tp2_dp2_bf16"]
    assert len({r["moment_bytes"] for r in rows}) == 2
    assert rows[0]["grad_bytes"] // 4 > sum(n for _, n, *_ in rows[0]["named_params"][0])
    no_do = measured["dense_dp4_bf16_nodistopt"][0]
    assert no_do["grad_bytes"] // 4 == sum(n for _, n, *_ in no_do["named_params"][0])
    assert no_do["main_param_bytes"] == no_do["grad_bytes"]  # fp32 copy of every parameter
    # bf16 gradient buffers: the same elements at half the bytes
    fp32, bf16 = measured["moe_ep2_dp2_bf16"][0], measured["moe_ep2_dp2_bf16_bf16grads"][0]
    assert 2 * bf16["grad_bytes"] == fp32["grad_bytes"] > 0
