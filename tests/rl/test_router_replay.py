"""MoE router replay (`rl.router_replay`, `kat_megatron/rl/router_replay.py`) on gloo ranks.

- `router_replay_worker.py` at EP=1 and EP=2 (a random tiny-qwen3-moe, 3 MoE layers, top-2 of
  8): the experts the colocated engine recorded (prefill windows and decode steps of prompts of
  different lengths) equal, per position and layer, those of one independent full forward with
  Megatron-Core's RECORD action; the training forward replaying them gives the free-routing
  log-probs within 1e-5 (the same choices; fp32 rounding of a different batch shape, measured
  <= 1.4e-6), padded and packed (THD) micro-batches alike; shifting every expert index by one
  changes the log-probs by > 0.1 (measured 3.2 / 4.2): the replay is applied.
- Stage rl with `rl.router_replay: true` runs 2 steps on the same MoE policy and logs the
  rollout / trainer mismatch within the bounds of the free-routing run (fp32 on CPU: routing
  rarely flips between engine and trainer, so replay cannot be expected to lower it here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_rl_stage import rl_config, task  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("ep", [1, 2])
def test_recorded_routing_is_the_models_and_replay_applies_it(tmp_path, run_ranks, ep):
    out = tmp_path / "rr.json"
    run_ranks([Path(__file__).with_name("router_replay_worker.py"), out], nproc=ep, timeout=600)
    r = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in r.items() if k != "routing_shapes"}))
    assert r["ep"] == ep and r["layers"] == 3
    assert [s[1] for s in r["routing_shapes"]] == r["positions"]  # every fed position
    assert all(s[0] == 3 and s[2] == 2 for s in r["routing_shapes"])
    assert all(r["recorded_vs_full"])
    assert r["replay_vs_free"] <= 1e-5 and r["replay_packed_vs_padded"] <= 1e-5
    assert r["shifted_vs_replay"] > 0.1
    assert r["engine_vs_replay"] <= 1e-5


def test_stage_rl_with_router_replay(task, tmp_path, kat):  # noqa: F811
    init = tmp_path / "init"
    kat(["train", str(REPO / "examples" / "tiny_pretrain" / "config.yaml"), "parallel.tp=1",
         "model.preset=tiny-qwen3-moe", "model.init_method_std=0.2", "training.steps=1",
         "checkpoint.save_interval=1", f"run.dir={init}"], timeout=600)  # fmt: skip
    over = {"model": {"preset": "tiny-qwen3-moe"}, "optimizer.lr": 1e-2, "optimizer.min_lr": 1e-2,
            "rl.prompts_per_step": 4, "rl.group_size": 4, "rl.micro_batch_size": 8,
            "rl.sampling": {"temperature": 1.0, "max_new_tokens": 16},
            "checkpoint.load": str(init / "checkpoints")}  # fmt: skip
    rows = {}
    for replay in (False, True):
        name = f"moe_replay_{replay}".lower()
        proc = kat(["train", str(rl_config(task, init, name, **over, **{"rl.router_replay": replay}))],
                   timeout=600)  # fmt: skip
        assert "step 2" in proc.stderr
        assert ("replays the experts of 3 MoE layers" in proc.stderr) == replay
        rows[replay] = [
            json.loads(x) for x in (task / name / "metrics.jsonl").read_text().splitlines()
        ]
    for replay, rs in rows.items():
        for r in rs:
            print(f"router_replay={replay} step {r['step']}: diff max "
                  f"{r['rollout/logprob_diff_max']:.2e} mean {r['rollout/logprob_diff_mean']:.2e}")  # fmt: skip
            assert r["rollout/logprob_diff_max"] <= 1e-4 and r["rollout/logprob_diff_mean"] <= 1e-5
    # step 1 samples from the same weights with the same seeds: the same rollouts either way
    assert rows[True][0]["response_tokens"] == rows[False][0]["response_tokens"]
