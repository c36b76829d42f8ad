"""vLLM as stage rl's rollout engine: `pytest tests/rl/test_vllm_rollout.py` (needs `make vllm`).

The policy is test_rl_stage.py's SFT'd tiny-dense model (32-wide heads, which vLLM's CPU
attention needs), from the same fixture: trained once per test session, shared by both modules.
- Refit parity (`vllm_parity_worker.py`, TP=1 and TP=2 training layouts, a MoE policy at
  EP=2, and vLLM at its own TP=2): on the same live
  weights, vLLM's greedy completions equal kat's engine token for token, and its log-probs equal
  kat's and the trainer's full forward within 1e-5. Both run fp32 and differ in kernels (oneDNN
  GEMMs and vLLM's paged CPU attention against torch matmul and SDPA) and summation order,
  ~1e-6 in practice (measured 1.2e-6 at most, TP=1 and TP=2); 1e-5 is the bound the megatron
  engine is held to against the trainer. Token equality is only meaningful without near-ties:
  the smallest top-1 margin along the greedy paths is checked > 1e-3. After an in-place weight
  change the stale worker is far off (log-prob error > 0.1: the check can fail) and one refit
  (0.1 MiB buckets: several, and the embedding alone in a larger segment) restores the bound.
  Seeded sampling (temperature 0.8, top-p/top-k) reports the raw distribution's log-probs, equal
  to the trainer's within 1e-5, and is reproducible.
- A 2-step stage-rl run with the vLLM engine (8 prompts x 8 rollouts, lr 1e-2) logs
  `rollout/logprob_diff_mean` <= 1e-5 and `rollout/logprob_diff_max` <= 1e-4 at both steps
  (measured: mean 2.7e-7 / 6.1e-7, max 5.8e-6 / 1.6e-5). The max runs over ~4,000 tokens
  sampled at temperature 1, many of low probability, where fp32 rounding of the log-softmax
  through 4 layers reaches 1e-5, hence the looser bound. Step 2 was sampled from the refitted
  weights: without the refit it would be off by far more (one lr 1e-2 Adam step moves every
  weight by ~1e-2; the parity test's 0.02 noise moved log-probs by up to 3). Resumed after
  step 1 (a fresh worker loaded from the checkpoint), step 2 is identical (rollouts, rewards,
  every metric): the in-memory refit delivered exactly the trained weights. The megatron
  engine logs the same metrics within the same bounds (test_rl_stage.py's TP=1 / TP=2 runs).
  Training at TP=2 (the refit gathers the shards) reproduces the TP=1 run: the same rollouts
  and rewards; loss, grad norm and entropy within relative 1e-4 at step 1 (test_rl_stage.py's
  TP=2 bound) and 5e-4 at step 2: the lr 1e-2 update (100x test_rl_stage's) raises the entropy
  from 0.18 to 2.4 and amplifies the first update's TP rounding (measured 9.1e-5 on the grad
  norm, 3.1e-6 on the entropy).
- Training at PP=2 and TP=2 x PP=2 with the vLLM engine, and `rl.rollout.replicas` of 1 at
  DP=2 and of 2 at one rank: 3 steps equal the one-rank run (rollouts and rewards exactly, loss
  and grad norm within relative 1e-5), and the refitted workers' log-probs stay within the
  stage bounds (the test's docstring has the figures).
- Without vLLM: `rl.rollout.engine=vllm` fails the config check with one line (no such
  Python; a Python without vllm); the mismatch metric against an explicit loop.

vLLM lives in `.venv-vllm` (`make vllm`); the vLLM tests skip when it is absent unless
KAT_REQUIRE_VLLM=1 (as tests/inference/test_vllm.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_rl_stage import TIMING_KEYS, rl_config, sft_ckpt, task  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("KAT_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
BOUND = 1e-5  # fp32 log-probs of fixed prompts, see the module doc
STAGE_BOUND = 1e-4  # max over a step's ~4,000 sampled tokens, see the module doc

if not VLLM_PYTHON.exists() and os.environ.get("KAT_REQUIRE_VLLM") == "1":
    raise RuntimeError(f"KAT_REQUIRE_VLLM=1 but {VLLM_PYTHON} is missing: run `make vllm`")
needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason=f"vLLM not installed ({VLLM_PYTHON}; `make vllm`)"
)
pytestmark = pytest.mark.timeout(1200)


@needs_vllm
@pytest.mark.parametrize("layout", ["tp1", "tp2", "moe_ep2", "tp1_vllm_tp2"])
def test_refit_parity_with_megatron_engine(task, sft_ckpt, tmp_path, run_ranks, layout):  # noqa: F811
    """moe_ep2: a random tiny-qwen3-moe (Qwen3-MoE in vLLM) with its 8 experts over 2 ranks
    (EP = DP = 2, a worker per replica): the refit gathers the expert-parallel shards.
    tp1_vllm_tp2: training at one rank, vLLM at its own TP=2 (`rl.rollout.tp`: two vLLM
    ranks in the worker, each loading its shard of the refitted full tensors)."""
    out = tmp_path / "parity.json"
    ckpt = "moe" if layout == "moe_ep2" else sft_ckpt
    nproc, vllm_tp = {"tp1": (1, 1), "tp2": (2, 1), "moe_ep2": (2, 1), "tp1_vllm_tp2": (1, 2)}[
        layout
    ]
    run_ranks([Path(__file__).with_name("vllm_parity_worker.py"), ckpt, task / "prompts.jsonl",
               out, str(vllm_tp)], nproc=nproc, timeout=600)  # fmt: skip
    r = json.loads(out.read_text())
    ep = 2 if layout == "moe_ep2" else 1
    assert (r["tp"], r["ep"], r["rollout_tp"]) == (nproc // ep, ep, vllm_tp)
    print(json.dumps({k: v for k, v in r.items()}, indent=None))
    for phase in ("initial", "after_refit"):
        got = r[phase]
        assert all(got["same_tokens"]), (phase, got)
        assert got["min_margin"] > 1e-3, (phase, got)
        assert got["max_vs_kat"] <= BOUND and got["max_vs_trainer"] <= BOUND, (phase, got)
    assert sum(r["initial"]["lengths"]) >= 6 * 4  # real completions, not immediate stops
    assert all(r["sampled"]["reproducible"]) and r["sampled"]["differs_from_greedy"] > 0
    assert r["sampled"]["max_vs_trainer"] <= BOUND
    assert r["stale"]["max_vs_trainer"] > 0.1  # without the refit vLLM is far off
    assert r["refit"]["refit_buckets"] >= 5 and r["refit"]["refit_bytes"] > 0


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: r["step"])


def _numeric(row: dict) -> dict:
    return {k: v for k, v in row.items()
            if isinstance(v, (int, float)) and not any(t in k for t in TIMING_KEYS)}  # fmt: skip


def _rollouts(run: Path) -> list:
    rows = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    return [(r["step"], r["prompt_ids"], [e["text"] for e in r["examples"]]) for r in rows]


@needs_vllm
def test_rl_stage_with_vllm_engine(task, sft_ckpt, kat):  # noqa: F811
    over = {"optimizer.lr": 1e-2, "optimizer.min_lr": 1e-2, "checkpoint.save_interval": 1,
            "rl.rollout": {"engine": "vllm", "refit_bucket_mb": 0.25},
            "rl.policy_loss": {"is_correction": "truncated"}}  # fmt: skip
    straight = rl_config(task, sft_ckpt, "vllm_straight", **over)
    proc = kat(["train", str(straight)], timeout=600)
    assert "vLLM refit 1:" in proc.stderr
    rows = _rows(task / "vllm_straight")
    assert [r["step"] for r in rows] == [1, 2] and all(r["groups/trained"] > 0 for r in rows)
    for r in rows:
        print(f"vllm step {r['step']}: diff max {r['rollout/logprob_diff_max']:.2e} mean "
              f"{r['rollout/logprob_diff_mean']:.2e}, rollout {r['rollout_tokens_per_s']:.0f} "
              f"tok/s, refit {r['refit_time_s']:.3f} s")  # fmt: skip
        assert r["rollout/logprob_diff_max"] <= STAGE_BOUND
        assert 0 <= r["rollout/logprob_diff_mean"] <= BOUND
        assert abs(r["is_ratio_mean"] - 1.0) <= BOUND

    split = rl_config(task, sft_ckpt, "vllm_split", **over)
    kat(["train", str(split), "training.exit_interval=1"], timeout=600)
    proc = kat(["train", str(split)], timeout=600)
    assert "resumed from" in proc.stderr
    assert [_numeric(r) for r in _rows(task / "vllm_split")] == [_numeric(r) for r in rows]
    assert _rollouts(task / "vllm_split") == _rollouts(task / "vllm_straight")

    tp2 = rl_config(task, sft_ckpt, "vllm_tp2", **over, **{"parallel.tp": 2})
    kat(["train", str(tp2)], nproc=2, timeout=600)
    for ra, rb in zip(rows, _rows(task / "vllm_tp2")):
        na, nb = _numeric(ra), _numeric(rb)
        for key in ("reward/total", "response_tokens", "acc", "groups/trained"):
            assert na[key] == nb[key], (key, na[key], nb[key])  # the same rollouts
        for key in ("grad_norm", "loss", "pg_loss", "entropy"):
            diff = abs(na[key] - nb[key])
            print(f"step {ra['step']} {key}: tp1 {na[key]:.6g} tp2 {nb[key]:.6g} diff {diff:.1e}")
            rel = 1e-4 if ra["step"] == 1 else 5e-4  # step 2: after one lr 1e-2 update
            assert diff <= rel * abs(na[key]) + 1e-7, key
        assert nb["rollout/logprob_diff_max"] <= STAGE_BOUND


@needs_vllm
def test_rl_stage_layouts_and_replicas_with_vllm_engine(task, sft_ckpt, kat):  # noqa: F811
    """3 RL steps with the vLLM engine repeat the one-rank run with training at PP=2 (2 ranks)
    and TP=2 x PP=2 (4 ranks), and with `rl.rollout.replicas` apart from the data-parallel size:
    one worker shared by DP=2 (its owner gathers both replicas' prompts and scatters the
    completions) and two workers on one rank (each takes half the prompts). The same rollouts and
    rewards (the worker's owner, tensor and pipeline rank 0, broadcasts its completions to both
    stages; vLLM's sampled tokens do not depend on how the requests are batched here), loss,
    grad norm, policy loss and entropy within relative 1e-5 (measured, relative: 0 on the loss,
    at most 9.1e-7 on the grad norm and 2e-7 on the entropy, both at TP=2 x PP=2; PP=2 alone 6e-8
    and 0: the pipeline changes no reduction but the grad norm's sum over stages and the tied
    embedding's gradient, TP=2 adds its own fp32 rounding; DP=2 its gradient all-reduce).
    Steps 2 and 3 were sampled after refits in which each stage sent its layers to the owner:
    vLLM's log-probs agree with the trainer's within the stage bounds; with the refit skipped they
    are off by max 0.34 / mean 5.9e-3 at step 2 (measured once at PP=2, refit call removed), so
    the check can fail."""
    vllm = {"engine": "vllm"}
    layouts = {
        "pp1": ({}, 1),
        "pp2": ({"parallel.pp": 2}, 2),
        "tp2pp2": ({"parallel.tp": 2, "parallel.pp": 2}, 4),
        "dp2_replicas1": ({"rl.rollout": {**vllm, "replicas": 1}}, 2),
        "replicas2": ({"rl.rollout": {**vllm, "replicas": 2}}, 1),
    }
    runs = {}
    for name, (par, nproc) in layouts.items():
        over = {"training.steps": 3, "rl.rollout": vllm, **par}
        kat(["train", str(rl_config(task, sft_ckpt, f"vllm_{name}", **over))], nproc=nproc,
            timeout=600)  # fmt: skip
        runs[name] = _rows(task / f"vllm_{name}")
    logs = {n: sorted(p.name for p in (task / f"vllm_{n}").glob("vllm_worker_*.log")) for n in runs}
    assert logs["dp2_replicas1"] == ["vllm_worker_0.log"]
    assert logs["replicas2"] == ["vllm_worker_0.log", "vllm_worker_1.log"]
    base = runs["pp1"]
    assert [r["step"] for r in base] == [1, 2, 3] and all(r["groups/trained"] > 0 for r in base)
    for name in list(layouts)[1:]:
        assert _rollouts(task / f"vllm_{name}") == _rollouts(task / "vllm_pp1"), name
        assert [r["step"] for r in runs[name]] == [1, 2, 3]
        for a, b in zip(base, runs[name]):
            for key in ("reward/total", "acc", "response_tokens", "groups/trained"):
                assert a[key] == b[key], (name, a["step"], key, a[key], b[key])
            for key in ("loss", "grad_norm", "pg_loss", "entropy"):
                diff = abs(a[key] - b[key])
                print(f"{name} step {a['step']} {key}: {a[key]:.6g} vs {b[key]:.6g} ({diff:.1e})")
                assert diff <= 1e-5 * abs(a[key]) + 1e-9, (name, a["step"], key)
            assert b["rollout/logprob_diff_max"] <= STAGE_BOUND, (name, b)
            assert b["rollout/logprob_diff_mean"] <= BOUND, (name, b)


def test_vllm_engine_missing_is_one_line_error(tmp_path):
    from kat_megatron.stages import load_run_config

    path = tmp_path / "c.yaml"
    path.write_text("stage: rl\nrl:\n  prompts: p.jsonl\n  rollout: {engine: vllm}\n")
    missing = tmp_path / "no-venv" / "bin" / "python"
    cases = {
        str(missing): f"rl.rollout.engine=vllm: no vLLM Python at {missing}; run `make vllm`",
        sys.executable: f"rl.rollout.engine=vllm: {sys.executable} cannot import vllm",
    }
    for python, message in cases.items():
        with pytest.raises(ValueError) as info:
            load_run_config(path, [f"rl.rollout.vllm_python={python}"])
        assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="rl.rollout.engine='sglang': unknown"):
        load_run_config(path, ["rl.rollout.engine=sglang"])
    with pytest.raises(ValueError, match="rl.rollout.refit_bucket_mb=0"):
        load_run_config(path, ["rl.rollout.refit_bucket_mb=0"])


def test_logprob_mismatch_metric_against_explicit_formula():
    """`rollout/logprob_diff_*` of one micro-batch: |rollout - trainer| over the mask, against
    a plain Python loop (exact: the same fp32 subtractions)."""
    import torch

    from kat_megatron.rl.logprobs import DIFF_MAX, DIFF_MEAN, logprob_mismatch

    g = torch.Generator().manual_seed(0)
    logp, rollout = -torch.rand(3, 5, generator=g) * 4, -torch.rand(3, 5, generator=g) * 4
    old = -torch.rand(3, 5, generator=g) * 4
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float)
    rollout[0, 0] = float("-inf")  # padding may hold anything
    for trainer, old_arg in ((logp, None), (old, old)):  # one update / several (old log-probs)
        diffs = [abs(float(rollout[b, t]) - float(trainer[b, t]))
                 for b in range(3) for t in range(5) if mask[b, t]]  # fmt: skip
        m = logprob_mismatch(old_arg, logp, rollout, mask)
        assert m[DIFF_MEAN].tolist() == pytest.approx([sum(diffs), len(diffs)], rel=1e-6)
        assert m[DIFF_MAX].tolist() == pytest.approx([max(diffs), 1.0], rel=1e-6)


@needs_vllm
def test_rl_stage_moe_at_ep2_and_pp2_with_vllm_engine(task, tmp_path, kat):  # noqa: F811
    """Stage rl of a MoE policy (tiny-qwen3-moe, random weights saved once) with the vLLM engine
    at EP=2 (experts over 2 ranks, a worker per replica) and at EP=2 x PP=2 (4 ranks, uneven
    stages of 1 + 2 layers: `parallel.first_stage_layers=1`) repeats the one-rank run: the same
    rollouts, entropy and grad norm within relative 1e-6 (gloo reductions in another order).
    The random policy earns no reward, so the update is the router's auxiliary loss (grad norm
    ~0.04, lr 1e-2); step 2 is sampled from the refitted weights, and vLLM's log-probs then agree
    with the trainer's within the stage bound at both layouts: the EP refit delivered them."""
    init = tmp_path / "init"
    kat(["train", str(REPO / "examples" / "tiny_pretrain" / "config.yaml"), "parallel.tp=1",
         "model.preset=tiny-qwen3-moe", "model.init_method_std=0.1", "training.steps=1",
         "checkpoint.save_interval=1", f"run.dir={init}"], timeout=600)  # fmt: skip
    over = {"model": {"preset": "tiny-qwen3-moe"},
            "optimizer.lr": 1e-2, "optimizer.min_lr": 1e-2,
            "rl.prompts_per_step": 4, "rl.group_size": 4, "rl.micro_batch_size": 8,
            "rl.sampling": {"temperature": 1.0, "max_new_tokens": 16},
            "rl.rollout": {"engine": "vllm"},
            "checkpoint.load": str(init / "checkpoints")}  # fmt: skip
    layouts = {"moe_ep1": ({}, 1), "moe_ep2": ({"parallel.ep": 2}, 2),
               "moe_ep2pp2": ({"parallel.ep": 2, "parallel.pp": 2,
                               "parallel.first_stage_layers": 1}, 4)}  # fmt: skip
    runs = {}
    for name, (par, nproc) in layouts.items():
        cfg = rl_config(task, init, name, **over, **par)
        kat(["train", str(cfg)], nproc=nproc, timeout=600)
        runs[name] = _rows(task / name)
    for name in ("moe_ep2", "moe_ep2pp2"):
        assert _rollouts(task / "moe_ep1") == _rollouts(task / name), name
        assert [r["step"] for r in runs[name]] == [1, 2]
        for a, b in zip(runs["moe_ep1"], runs[name]):
            assert a["response_tokens"] == b["response_tokens"] and a["groups/trained"] > 0
            for key in ("grad_norm", "entropy"):
                assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (name, key, a[key], b[key])
            assert a["grad_norm"] > 1e-3  # an update happened: step 2 tests the refit
            for r in (a, b):
                assert r["rollout/logprob_diff_max"] <= STAGE_BOUND
                assert r["rollout/logprob_diff_mean"] <= BOUND
