"""`kat train` with `stage: rl` (Step-SRPO / GRPO): numerics, layouts, resume, learning.

All runs start from one tiny policy SFT'd on the synthetic AutoThink task
(`kat_megatron.data.synthetic_tasks`: easy sums answerable directly, hard products mod 10 that
need a chain) with cold-start data that reasons on half the easy prompts and on every hard one.
- Log-probs: at TP=2 (sequence parallel, fp32) the rollout engine's log-probs of its sampled
  tokens equal the trainer's recomputed ones through the RL forward step within 1e-5 (both are
  fp32 log-softmaxes of the same weights; only the summation order of a KV-cached decode vs. a
  full forward and of the vocab-parallel reductions differ, ~1e-6 in practice); log-probs and
  entropy from vocab-sharded logits equal a full-vocabulary torch reference within 1e-5, and
  the entropy's gradient equals autograd's within 1e-6.
- Layouts: two RL steps (with a KL term to the frozen SFT reference and the truncated IS
  correction) at TP=2 reproduce one rank: identical rollouts (same per-request seeds, so
  identical rewards and lengths), grad norm, entropy and KL within relative 1e-4 plus 1e-7
  absolute (fp32 TP reductions change summation order; 1e-4 leaves room for that through one
  Adam step; the KL is ~0 at the first step, where the policy is the reference).
- Resume: at DP=2 with dynamic sampling and forced-mode probes, 4 steps straight equal 2 steps,
  exit, resume, 2 steps: the same prompts in the same order and bitwise-equal metrics.
- Learning: Step-SRPO lowers the think-on rate on easy prompts while their accuracy and the
  reward hold (see the test for the measured spread); GRPO is not run.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from kat_megatron.data.synthetic_tasks import (
    coldstart_records,
    make_tasks,
    prompt_record,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(1800)  # several multi-rank trainings
TIMING_KEYS = ("time", "per_s")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rl_task")
    write_jsonl(root / "prompts.jsonl", [prompt_record(e) for e in make_tasks(128, seed=5)])
    return root


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, kat) -> Path:
    """The SFT'd policy every RL run starts from (one rank), trained once per test session:
    test_vllm_rollout.py starts from the same checkpoint, and under pytest-xdist the first
    worker to need it trains it into the workers' shared temporary directory while the others
    wait on a file lock (the run is deterministic, so either module training it is the same)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "rl_sft_shared"
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "sft" / "checkpoints" / "iter_0000600"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / "done").exists():
            sft = coldstart_records(2000, seed=1, think_on_rate={"easy": 0.5, "hard": 1.0})
            write_jsonl(root / "sft.jsonl", sft)
            steps = {"steps": 600, "micro_batch_size": 4, "global_batch_size": 4, "seed": 3}
            cfg = {
                "stage": "sft",
                "model": {"preset": "tiny-dense"},
                "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20},
                "training": steps,
                "data": {"jsonl": [str(root / "sft.jsonl")], "seq_length": 256},
                "logging": {"tensorboard": False, "interval": 100},
                "run": {"dir": str(root / "sft")},
            }
            path = root / "sft.yaml"
            path.write_text(yaml.safe_dump(cfg))
            start = time.perf_counter()
            kat(["train", str(path)])
            print(f"SFT: {cfg['training']['steps']} steps in {time.perf_counter() - start:.0f} s")
            assert ckpt.is_dir(), ckpt
            (root / "done").write_text("")
    return ckpt


def rl_config(task: Path, sft: Path, run: str, **over) -> Path:
    """A Step-SRPO config from the SFT policy; `over` maps dotted keys to values."""
    cfg = {
        "stage": "rl",
        "model": {"preset": "tiny-dense"},
        "optimizer": {"lr": 1e-4, "min_lr": 1e-4, "weight_decay": 0.0, "decay_style": "constant"},
        "training": {"steps": 2, "seed": 7},
        "rl": {
            "prompts": str(task / "prompts.jsonl"),
            "prompts_per_step": 8,
            "group_size": 8,
            "sampling": {"temperature": 1.0, "max_new_tokens": 64},
            "micro_batch_size": 16,
            "max_sequence_length": 128,
        },
        "checkpoint": {"load": str(sft), "save": False},
        "logging": {"tensorboard": False},
        "run": {"dir": str(task / run)},
    }
    for key, value in over.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = task / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def numeric(row: dict) -> dict:
    return {
        k: v
        for k, v in row.items()
        if isinstance(v, (int, float)) and not any(t in k for t in TIMING_KEYS)
    }


def test_rollout_logprobs_equal_trainer_logprobs_tp2(sft_ckpt, tmp_path, run_ranks):
    out = tmp_path / "worker.json"
    run_ranks([Path(__file__).with_name("rl_worker.py"), sft_ckpt, out], nproc=2, timeout=600)
    r = json.loads(out.read_text())
    print("TP=2 log-prob / entropy checks:", r)
    assert r["tokens"] > 100  # 12 rollouts of a real policy
    assert r["max_logprob_diff"] <= 1e-5
    assert abs(r["is_ratio_mean"] - 1.0) <= 1e-5 and r["normaliser"] == r["tokens"]
    assert r["max_vs_full_vocab_logprob"] <= 1e-5
    assert r["max_vs_full_vocab_entropy"] <= 1e-5
    assert r["entropy_grad_max_err"] <= 1e-6 * max(1.0, r["entropy_grad_scale"])


def test_rl_steps_tp2_match_one_rank(task, sft_ckpt, kat, metrics):
    over = {"rl.policy_loss": {"kl_coef": 0.05, "kl_estimator": "k3", "is_correction": "truncated"}}
    base = rl_config(task, sft_ckpt, "tp1", **over)
    kat(["train", str(base)])
    tp2 = rl_config(task, sft_ckpt, "tp2", **over, **{"parallel.tp": 2})
    kat(["train", str(tp2)], nproc=2)
    a, b = metrics(task / "tp1"), metrics(task / "tp2")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        na, nb = numeric(ra), numeric(rb)
        assert na.keys() == nb.keys()
        for key in ("reward/total", "response_tokens", "acc", "think_on_rate", "groups/trained"):
            assert na[key] == nb[key], (key, na[key], nb[key])  # the same rollouts
        for key in ("grad_norm", "entropy", "loss", "pg_loss", "kl", "is_ratio_mean"):
            diff = abs(na[key] - nb[key])
            print(f"step {ra['step']} {key}: tp1 {na[key]:.6g} tp2 {nb[key]:.6g} diff {diff:.1e}")
            assert diff <= 1e-4 * abs(na[key]) + 1e-7, key  # + 1e-7: kl is ~0 at step 1
    assert a[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert a[1]["kl"] > 0
    # The colocated engine's rollout-vs-trainer log-prob mismatch, the metric the vLLM engine
    # logs too (bounds of test_vllm_rollout.py: 1e-4 max over a step's ~4,000 sampled tokens,
    # 1e-5 mean); no refit with this engine.
    for r in (*a, *b):
        print(f"megatron engine step {r['step']}: diff max {r['rollout/logprob_diff_max']:.2e}")
        assert r["rollout/logprob_diff_max"] <= 1e-4 and "refit_time_s" not in r
        assert 0 <= r["rollout/logprob_diff_mean"] <= 1e-5


def test_ppo_epochs_and_mini_batches_tp2_match_one_rank(task, sft_ckpt, kat, metrics):
    """rl.ppo_epochs=2 x rl.mini_batches=2: four optimizer steps per RL step against the old
    log-probs of the policy before the first, so the PPO ratio leaves 1 and the clip acts; the
    LR schedule advances once per RL step (warmup 2: lr 0 at step 1, half at step 2); TP=2
    reproduces one rank."""
    over = {"rl.ppo_epochs": 2, "rl.mini_batches": 2, "optimizer.lr": 1e-2,
            "optimizer.min_lr": 1e-2, "optimizer.warmup_steps": 2}  # fmt: skip
    kat(["train", str(rl_config(task, sft_ckpt, "ppo_tp1", **over))])
    kat(["train", str(rl_config(task, sft_ckpt, "ppo_tp2", **over, **{"parallel.tp": 2}))],
        nproc=2)  # fmt: skip
    a, b = metrics(task / "ppo_tp1"), metrics(task / "ppo_tp2")
    assert [r["updates"] for r in a] == [r["updates"] for r in b] == [4, 4]
    assert [r["lr"] for r in a] == [0.0, pytest.approx(5e-3)]
    for ra, rb in zip(a, b):
        na, nb = numeric(ra), numeric(rb)
        for key in ("reward/total", "response_tokens", "acc"):
            assert na[key] == nb[key], (key, na[key], nb[key])  # the same rollouts
        for key in ("grad_norm", "loss", "pg_loss", "clip_frac", "approx_kl"):
            diff = abs(na[key] - nb[key])
            print(f"step {ra['step']} {key}: tp1 {na[key]:.6g} tp2 {nb[key]:.6g} diff {diff:.1e}")
            assert diff <= 1e-4 * abs(na[key]) + 1e-6, key
    # lr 0: the policy does not move, every ratio stays 1 (up to padding-dependent rounding)
    assert a[0]["approx_kl"] < 1e-8 and a[0]["clip_frac"] == 0
    # then the later updates of a step see the earlier ones: ratios leave 1 and get clipped
    assert a[1]["approx_kl"] > 1e-5 and a[1]["clip_frac"] > 0


def test_resume_continues_prompt_order(task, sft_ckpt, kat, metrics):
    over = {
        "training.steps": 4,
        "rl.dynamic_sampling": True,
        "rl.forced_probes": 2,
        "rl.prompts_per_step": 4,
        "rl.group_size": 4,
        "rl.micro_batch_size": 8,
        "checkpoint.save_interval": 2,
    }
    straight = rl_config(task, sft_ckpt, "straight", **over)
    kat(["train", str(straight)], nproc=2)
    split = rl_config(task, sft_ckpt, "split", **over)
    kat(["train", str(split), "training.exit_interval=2"], nproc=2)
    assert [r["step"] for r in metrics(task / "split")] == [1, 2]
    proc = kat(["train", str(split)], nproc=2)
    assert "resumed from" in proc.stderr
    a, b = metrics(task / "straight"), metrics(task / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [numeric(r) for r in a] == [numeric(r) for r in b]

    def prompts(run):
        rows = [json.loads(x) for x in (task / run / "rollouts.jsonl").read_text().splitlines()]
        return [(r["step"], r["prompt_ids"], [e["text"] for e in r["examples"]]) for r in rows]

    assert prompts("straight") == prompts("split")
    assert sum(r["groups/probes"] for r in a) > 0  # the probe path ran
    drawn = [len(p) for _, p, _ in prompts("straight")]
    assert all(n >= 4 for n in drawn)  # refills draw more than prompts_per_step when needed


def window_means(rows: list[dict], key: str, n: int = 5) -> tuple[float, float]:
    """Mean of `key` over the first and the last `n` steps (steps without it are skipped: a
    step may draw no prompt of a category)."""
    vals = [r[key] for r in rows if key in r]
    return sum(vals[:n]) / len(vals[:n]), sum(vals[-n:]) / len(vals[-n:])


LEARN_KEYS = ("reward/total", "reward/answer", "acc", "acc/easy", "acc/hard",
              "think_on_rate/easy", "think_on_rate/hard", "response_tokens")  # fmt: skip


def test_step_srpo_learns_to_answer_easy_prompts_directly(task, sft_ckpt, kat, metrics):
    """30 steps of 8 prompts x 8 rollouts of Step-SRPO from the SFT policy. (GRPO is not run in
    the suite, to save its time: it moves the easy think-on rate only through accuracy
    differences between the modes, which vary from one SFT policy to the next, so there is
    nothing to assert about it.)

    Measured with the tiny-dense preset of 32-wide heads (2 heads, hidden 64), means over the
    first -> last 5 steps, SFT lr 3e-3 x 600 steps; SFT seed 3 with RL seeds 7 (the suite's run),
    8, 9, then SFT seed 4 with RL seeds 7, 8:
      reward/total       0.499->0.584 | 0.524->0.593 | 0.494->0.576 | 0.398->0.652 | 0.404->0.407
      think_on_rate/easy 0.450->0.040 | 0.410->0.096 | 0.492->0.075 | 0.548->0.170 | 0.651->0.413
      acc/easy           0.298->0.404 | 0.197->0.412 | 0.190->0.244 | 0.173->0.296 | 0.205->0.183
    The same suite run on a freshly installed machine (2026-12-04, the same code and data, other
    fp rounding somewhere in the stack, so other samples from step 1 on): reward 0.414->0.487,
    think_on_rate/easy 0.424->0.068, acc/easy 0.185->0.129. The think-on rate on easy prompts
    falls in every run (by 0.24 at least: the margin is half that) while their accuracy holds
    within sampling noise: a 5-step window holds ~160 easy rollouts, so at accuracy ~0.2 the
    difference of two windows has a standard deviation of ~0.045; the bound, -0.10, is ~2.2 of
    them (the earlier -0.05 failed on the fresh machine's -0.057). The reward's rise is not robust at this scale (+0.003 in
    the last run; with 50 RL steps one run went 0.524 -> 0.482 while its easy accuracy rose, as
    hard-prompt accuracy fell), so the test asserts only that it holds. With the earlier 16-wide
    heads (4 heads) and SFT lr 5e-3 the reward rose by 0.17-0.23 in the three runs measured then.
    An SFT policy trained longer (lr 5e-3 x 900) answered easy prompts worse directly than with
    a chain, and Step-SRPO then raised their think-on rate (0.55 -> 0.94), as its mode reward
    prescribes (docs/step_srpo.md). Wall time here: SFT ~50 s, the RL run ~25 s.
    """
    common = {
        "training.steps": 30,
        "optimizer.lr": 3e-4,
        "optimizer.min_lr": 3e-4,
        "optimizer.warmup_steps": 3,
    }
    runs = {}
    for estimator in ("step_srpo",):
        over = {**common, "rl.advantages": {"estimator": estimator}}
        config = rl_config(task, sft_ckpt, f"learn_{estimator}", **over)
        start = time.perf_counter()
        kat(["train", str(config)])
        rows = metrics(task / f"learn_{estimator}")
        runs[estimator] = rows
        print(f"\n{estimator}: {len(rows)} steps in {time.perf_counter() - start:.0f} s; "
              "first/last 5 steps:")  # fmt: skip
        for key in LEARN_KEYS:
            first, last = window_means(rows, key)
            print(f"  {key:22s} {first:7.3f} -> {last:7.3f}")
    srpo = runs["step_srpo"]
    reward = window_means(srpo, "reward/total")
    easy_on = window_means(srpo, "think_on_rate/easy")
    easy_acc = window_means(srpo, "acc/easy")
    assert easy_on[1] <= easy_on[0] - 0.12, easy_on
    assert easy_acc[1] >= easy_acc[0] - 0.10, easy_acc  # accuracy holds (within noise: above)
    assert reward[1] >= reward[0] - 0.05, reward  # and so does the reward
