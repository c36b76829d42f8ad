"""`kat demo --quick`: the whole pipeline end to end (a few steps per stage) on 2 gloo ranks.

Asserts that every stage produced what the next one consumed and what a user is pointed to:
the teacher/student checkpoints, AutoThink data built against the served teacher, an RL
metrics log, three-mode eval results, a Hugging Face export that `transformers` loads, and the
report with its plots; then that a rerun resumes (skips every finished step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(2400)  # the demo, its resume and a one-seed ablation
REPO = Path(__file__).resolve().parents[2]


def _demo(out: Path, *extra: str) -> str:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        rc = subprocess.call(
            [sys.executable, "-m", "kat_megatron.cli", "demo", "--quick", "--out", str(out),
             *extra],
            stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=1100,
        )  # fmt: skip
    text = log.read_text()
    assert rc == 0, text[-4000:]
    return text


def test_quick_demo_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    text = _demo(out)
    for i, name in enumerate(
        ["data", "teacher", "kd", "autothink", "sft", "rl", "eval", "export", "report"], 1
    ):
        assert f"[{i}/9] {name}: finished" in text

    tag = json.loads((out / "autothink" / "tag" / "summary.json").read_text())
    assert tag["counts"]["processed"] == 12  # every prompt was sampled from the served teacher
    assert tag["requests"]["sent"] > 0
    stats = json.loads((out / "autothink" / "sft_stats.json").read_text())
    rows = (out / "autothink" / "sft.jsonl").read_text().splitlines()
    assert len(rows) == stats["pipeline_rows"] + stats["gold_rows"] >= 16

    rl = [json.loads(x) for x in (out / "student_rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl] == [1, 2]
    assert all("reward/total" in r and "think_on_rate" in r for r in rl)

    for run in ("student_sft", "student_rl"):
        ev = json.loads((out / "eval" / run / "eval.json").read_text())
        assert set(ev["summary"]) == {"auto", "think_on", "think_off"}
        assert list(ev["frontier"]["overall"]) == ["think_off", "think_on", "oracle", "auto"]
        assert "oracle_agreement" in ev["summary"]["auto"]["overall"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.num_hidden_layers == 4  # the distilled student

    report = (out / "report.md").read_text()
    for heading in ("## Evaluation", "## Step-SRPO training", "## Before RL: the SFT student"):
        assert heading in report
    assert "### Frontier: accuracy against tokens" in report
    for png in ("accuracy.png", "tokens.png", "frontier.png", "rl_reward.png",
                "rl_think_on_rate.png"):  # fmt: skip
        assert (out / png).stat().st_size > 1000 and f"({png})" in report
    for png in ("eval/student_sft/accuracy.png", "eval/student_sft/tokens.png",
                "eval/student_sft/frontier.png"):  # SFT section  # fmt: skip
        assert (out / png).stat().st_size > 1000 and f"({png})" in report

    again = _demo(out)
    assert again.count("done earlier") == 9

    # --ablation (one seed at quick scale): the demo resumes, then Step-SRPO, GRPO, no RL.
    text = _demo(out, "--ablation", "--seeds", "0")
    assert text.count("done earlier") == 9 and "[5/5] eval_no_rl_s0: finished" in text
    agg = json.loads((out / "ablation" / "ablation.json").read_text())
    assert agg["seeds"] == {"step_srpo": [0], "grpo": [0], "no_rl": [0]}
    # no_rl is the SFT checkpoint evaluated with the demo's eval seed: the demo's own SFT eval,
    # copied rather than rerun.
    assert "the demo's own SFT eval" in text
    sft = json.loads((out / "eval" / "student_sft" / "eval.json").read_text())["summary"]["auto"]
    for cat, row in agg["arms"]["no_rl"].items():
        assert row["accuracy"]["mean"] == sft[cat]["accuracy"]
        assert row["tokens_mean"]["mean"] == sft[cat]["tokens_mean"]
    # Step 1 of both RL arms samples from the SFT weights with the demo RL run's seed: the same
    # rollouts and answer rewards as the demo's own Step-SRPO run (mode_weight moves only the
    # mode reward, its weight in reward/total, and the advantages).
    for arm in ("step_srpo", "grpo"):
        rows = (out / "ablation" / f"{arm}_s0" / "metrics.jsonl").read_text().splitlines()
        first = json.loads(rows[0])
        for key in ("response_tokens", "think_on_rate", "reward/answer"):
            assert first[key] == pytest.approx(rl[0][key], rel=1e-6), (arm, key)
    assert "| step_srpo - grpo (paired) |" in (out / "ablation" / "ablation.md").read_text()
