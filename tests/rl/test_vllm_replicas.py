"""`rl.rollout.replicas` placement without processes: `pytest tests/rl/test_vllm_replicas.py`.

The multi-rank paths (a worker shared by two data-parallel replicas, two workers on one rank)
run in tests/rl/test_vllm_rollout.py::test_rl_stage_layouts_and_replicas_with_vllm_engine.
"""

from __future__ import annotations

import pytest

from kat_megatron.rl import vllm_replicas
from kat_megatron.rl.rollout_config import RolloutConfig
from kat_megatron.rl.vllm_replicas import ReplicaPlan, split


def _dp(monkeypatch, size: int, rank: int) -> None:
    ps = vllm_replicas.parallel_state
    monkeypatch.setattr(ps, "get_data_parallel_world_size", lambda: size)
    monkeypatch.setattr(ps, "get_data_parallel_rank", lambda: rank)


@pytest.mark.parametrize(
    "dp, rank, replicas, expected",
    [  # (share, per_owner, owner, first_index)
        (4, 0, None, (1, 1, True, 0)),
        (4, 3, None, (1, 1, True, 3)),
        (1, 0, 3, (1, 3, True, 0)),
        (2, 1, 4, (1, 2, True, 2)),
    ],
)
def test_plan_without_shared_workers(monkeypatch, dp, rank, replicas, expected):
    _dp(monkeypatch, dp, rank)
    plan = ReplicaPlan.build(replicas, source=True)
    assert (plan.share, plan.per_owner, plan.owner, plan.first_index) == expected
    assert plan.replicas == (dp if replicas is None else replicas) and plan.group is None
    assert plan.scatter(plan.gather([("p", "s")])) == [("p", "s")]  # no block: local
    assert not ReplicaPlan.build(replicas, source=False).owner  # only a group's first rank


def test_replicas_must_divide_or_multiply_the_data_parallel_size(monkeypatch):
    _dp(monkeypatch, 4, 0)
    with pytest.raises(ValueError, match=r"rl.rollout.replicas=3: expected a divisor or a "
                                         r"multiple of the data-parallel size 4"):  # fmt: skip
        ReplicaPlan.build(3, source=True)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rollout.replicas"):
            RolloutConfig(replicas=bad)


def test_split_is_contiguous_and_balanced():
    items = list(range(7))
    parts = split(items, 3)
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert split([], 2) == [[], []] and split(items, 1) == [items]
