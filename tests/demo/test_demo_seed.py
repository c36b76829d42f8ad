"""`kat demo --seed S` reaches every stage: `pytest tests/demo/test_demo_seed.py` (no training:
the demo's `kat` commands are recorded instead of run).

That one seed makes two runs give the same report was measured, not tested here (two quick
demos cost 8 minutes): `kat demo --quick --seed 1` twice on one machine gave report.md files
equal but for their timestamps and paths (docs/autothink_data.md, "Seeds").
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from kat_megatron.demo import pipeline
from kat_megatron.demo.pipeline import QUICK, SEED_STRIDE, Demo, config_seed


def _recorded(tmp_path: Path, seed: int, monkeypatch) -> tuple[Demo, list[tuple[str, ...]]]:
    calls: list[tuple[str, ...]] = []
    demo = Demo(tmp_path / "demo", QUICK, nproc=2, echo=lambda *a: None, seed=seed)
    monkeypatch.setattr(pipeline, "latest", lambda run_dir: Path(run_dir) / "iter_0000001")
    monkeypatch.setattr(demo.r, "kat", lambda *args, **kw: calls.append(args) or 0)
    monkeypatch.setattr(demo.r, "serve", lambda *a, **kw: contextlib.nullcontext("http://x/v1"))
    monkeypatch.setattr(demo, "_sft_rows", lambda work: None)
    demo.check_seed()
    for name, fn in demo.steps():
        if name not in ("report",):
            fn()
    return demo, calls


def test_one_seed_reaches_every_stage(tmp_path, monkeypatch):
    s = 3
    demo, calls = _recorded(tmp_path, s, monkeypatch)
    off = SEED_STRIDE * s
    trains = {c[1].rsplit("/", 1)[-1]: c for c in calls if c[0] == "train"}
    assert set(trains) == {"teacher.yaml", "student_kd.yaml", "student_sft.yaml", "student_rl.yaml"}
    for config, cmd in trains.items():
        assert f"training.seed={config_seed(config) + off}" in cmd, cmd
    data = {c[1]: c for c in calls if c[0] == "data"}
    assert f"seed={off}" in data["tag"] and f"seed={off}" in data["synthesize"]
    evals = [c for c in calls if c[0] == "eval"]
    assert len(evals) == 2 and all(c[c.index("--seed") + 1] == str(off) for c in evals)
    prompts = [json.loads(x) for x in (demo.data / "prompts.jsonl").read_text().splitlines()]
    assert prompts[0]["id"].startswith(f"synth-{2 + off}-")  # the prompt generator's seed
    evals_data = (demo.data / "eval.jsonl").read_text().splitlines()
    assert json.loads(evals_data[0])["id"].startswith(f"synth-{3 + off}-")


def test_seed_zero_is_the_measured_configuration(tmp_path, monkeypatch):
    _, calls = _recorded(tmp_path, 0, monkeypatch)
    teacher = next(c for c in calls if c[0] == "train")
    assert f"training.seed={config_seed('teacher.yaml')}" in teacher


def test_resume_with_another_seed_is_refused(tmp_path):
    Demo(tmp_path / "d", QUICK, nproc=2, seed=1).check_seed()
    Demo(tmp_path / "d", QUICK, nproc=2, seed=1).check_seed()  # same seed: resumes
    with pytest.raises(ValueError, match="started with --seed 1"):
        Demo(tmp_path / "d", QUICK, nproc=2, seed=2).check_seed()
