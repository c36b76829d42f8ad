"""`kat demo --task steps` reaches the data it needs: `pytest tests/demo/test_demo_task.py` (no
training: the demo's `kat` commands are recorded instead of run)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import pytest

from kat_megatron.commands import demo as demo_cmd
from kat_megatron.data import synthetic_steps
from kat_megatron.demo import pipeline
from kat_megatron.demo.pipeline import QUICK, TASKS, Demo


def _recorded(tmp_path: Path, task: str, monkeypatch) -> tuple[Demo, list[tuple[str, ...]]]:
    calls: list[tuple[str, ...]] = []
    demo = Demo(tmp_path / task, QUICK, nproc=2, echo=lambda *a: None, task=task)
    monkeypatch.setattr(pipeline, "latest", lambda run_dir: Path(run_dir) / "iter_0000001")
    monkeypatch.setattr(demo.r, "kat", lambda *args, **kw: calls.append(args) or 0)
    monkeypatch.setattr(demo.r, "serve", lambda *a, **kw: contextlib.nullcontext("http://x/v1"))
    demo.check_seed()
    for name, fn in demo.steps():
        if name == "autothink":
            (demo.out / "autothink" / "coldstart").mkdir(parents=True)
            (demo.out / "autothink" / "coldstart" / "data.jsonl").write_text("")
        if name != "report":
            fn()
    return demo, calls


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_steps_task_data_judges_and_gold_rows(tmp_path, monkeypatch):
    demo, calls = _recorded(tmp_path, "steps", monkeypatch)
    for name, n in (("prompts", QUICK.prompts), ("eval", QUICK.eval_prompts)):
        rows = _jsonl(demo.data / f"{name}.jsonl")
        assert len(rows) == n and all(r["category"] in synthetic_steps.CATEGORIES for r in rows)
        assert all(r["messages"][0]["content"].endswith(" mod 10?") for r in rows)
    corpus = _jsonl(demo.data / "corpus.jsonl")
    assert len(corpus) == QUICK.corpus_docs and "mod 10?" in corpus[0]["text"]
    # the cold start writes the task's judges (one per mode), not the easy/hard ones
    (coldstart,) = [c for c in calls if c[:2] == ("data", "coldstart")]
    (judges,) = [a for a in coldstart if a.startswith("judge_templates=")]
    assert json.loads(judges.split("=", 1)[1]) == synthetic_steps.JUDGE
    # no pipeline rows: the top-up gold rows are the steps task's, with its prior
    gold = _jsonl(demo.out / "autothink" / "sft.jsonl")
    assert len(gold) == QUICK.min_sft_rows and {r["source"] for r in gold} == {"gold"}
    for r in gold:
        n_factors = r["messages"][0]["content"].count("*") + 1
        assert ("<think_on>" in r["messages"][1]["content"]) == (n_factors >= 3)
    assert json.loads((demo.out / "seed.json").read_text()) == {"seed": 0, "task": "steps"}


def test_default_task_is_easy_hard_and_unchanged(tmp_path, monkeypatch):
    demo, calls = _recorded(tmp_path, "easy-hard", monkeypatch)
    rows = _jsonl(demo.data / "prompts.jsonl")
    assert {r["category"] for r in rows} == {"easy", "hard"}
    (coldstart,) = [c for c in calls if c[:2] == ("data", "coldstart")]
    assert not any(a.startswith("judge_templates=") for a in coldstart)  # coldstart.yaml's


def test_task_is_fixed_for_a_run_and_the_cli_knows_every_task(tmp_path):
    Demo(tmp_path / "d", QUICK, nproc=2, task="steps").check_seed()
    Demo(tmp_path / "d", QUICK, nproc=2, task="steps").check_seed()  # same task: resumes
    with pytest.raises(ValueError, match="started with --task steps"):
        Demo(tmp_path / "d", QUICK, nproc=2).check_seed()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "seed.json").write_text('{"seed": 0}')  # a run from before --task
    Demo(tmp_path / "old", QUICK, nproc=2).check_seed()
    with pytest.raises(ValueError, match="task"):
        Demo(tmp_path / "x", QUICK, nproc=2, task="nope")
    parser = argparse.ArgumentParser()
    demo_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--task", "steps"])
    assert args.task == "steps" and parser.parse_args(["demo"]).task == "easy-hard"
    (action,) = [a for a in parser._subparsers._group_actions[0].choices["demo"]._actions
                 if a.dest == "task"]  # fmt: skip
    assert list(action.choices) == list(TASKS)
