"""`kat eval`: prompt loading, forced modes, scoring and outputs with a scripted engine whose
answers are known, the demo report on synthetic inputs, and the real CLI on a tiny checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kat_megatron.data.autothink import forced_mode_prefix
from kat_megatron.data.synthetic_tasks import (
    DEFAULT_JUDGE,
    autothink_answer,
    make_tasks,
    prompt_record,
    write_jsonl,
)
from kat_megatron.eval.metrics import summarize
from kat_megatron.eval.report import write_eval_outputs, write_report
from kat_megatron.eval.runner import EvalConfig, load_prompts, run_eval
from kat_megatron.inference.types import Completion

pytestmark = pytest.mark.timeout(300)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ScriptedEngine:
    """Answers synthetic tasks like an ideal AutoThink model, except forced think_off on hard
    prompts, which is right only for sample 0 of each prompt; a first pass that stops at
    `</judge>` gets the category's judge, except for prompt `no_judge_id`, whose judge is
    never closed. Tokens are whitespace words."""

    def __init__(self, tasks, samples: int, no_judge_id: str = "") -> None:
        self.by_question = {ex.question: ex for ex in tasks}
        self.samples = samples
        self.no_judge_id = no_judge_id
        self.calls: list[tuple[list[str], object]] = []

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def generate_text(self, prompts, params):
        self.calls.append((list(prompts), params))
        out = []
        for i, p in enumerate(prompts):
            ex = self.by_question[re.search(r"user\n(.*?)<\|im_end\|>", p).group(1)]
            if "</judge>" in params.stop_strings:
                judge = "unclosed" if ex.id == self.no_judge_id else DEFAULT_JUDGE[ex.category]
                text = f"{judge}\n" + "</judge>" * (ex.id != self.no_judge_id)
            elif p.endswith("<think_on>\n<think>\n"):
                text = f"{ex.reasoning}\n</think>\n\n<answer>\n{ex.answer}\n</answer><|im_end|>"
            elif p.endswith("<think_off>\n<answer>\n"):
                right = ex.category == "easy" or i % self.samples == 0
                text = f"{ex.answer if right else 'wrong'}\n</answer><|im_end|>"
            else:
                mode = "think_on" if ex.category == "hard" else "think_off"
                text = autothink_answer(ex, mode).removeprefix("<judge>\n") + "<|im_end|>"
            out.append(Completion([1], self.encode(text), [0.0] * len(text.split()), text, "stop"))
        return out


def test_prompt_file_errors_name_file_and_line(tmp_path):
    good = prompt_record(make_tasks(1, 0)[0])
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "id": "x", "reference": None}),
        json.dumps({**good, "id": "y", "verifier": "nope"}),
        json.dumps(good),  # duplicate id
        json.dumps(
            {"id": "z", "messages": [{"role": "assistant", "content": "hi"}], "reference": "1"}
        ),  # fmt: skip
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    with pytest.raises(ValueError) as err:
        load_prompts(path)
    msg = str(err.value)
    assert "5 bad line(s)" in msg
    for n, reason in [(2, "invalid JSON"), (3, "reference"), (4, "unknown verifier"),
                      (5, "duplicate id"), (6, "user turn")]:  # fmt: skip
        assert re.search(rf"{re.escape(str(path))}:{n}: .*{reason}", msg), (n, msg)
    path.write_text(json.dumps({"query": "What is 1 + 1?", "reference": "2"}) + "\n")
    (p,) = load_prompts(path)
    assert (p.id, p.category, p.verifier) == ("line-1", "default", "exact_match")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("forced_judge", ["model", "prefill"])
def test_run_eval_with_scripted_engine(tmp_path, forced_judge):
    tasks = make_tasks(8, seed=3)
    path = write_jsonl(tmp_path / "p.jsonl", [prompt_record(ex) for ex in tasks])
    prompts = load_prompts(path)
    engine = ScriptedEngine(tasks, samples=3, no_judge_id=tasks[1].id)
    cfg = EvalConfig(modes=("auto", "think_on", "think_off"), samples=3, temperature=0.7,
                     chunk_size=6, stop_token_ids=[7], forced_judge=forced_judge)  # fmt: skip
    results = run_eval(engine, prompts, cfg, progress=False)
    assert len(results) == 3 * 8 * 3
    # the engine saw chat prompts ending with the generation prompt (auto, and the judge pass),
    # and forced prompts ending with the forced prefix: the model's judge or the fixed one
    texts = [t for call, _ in engine.calls for t in call]
    first_pass = 24 if forced_judge == "model" else 0
    assert sum(t.endswith("<|im_start|>assistant\n<judge>\n") for t in texts) == 24 + first_pass
    for mode in ("think_on", "think_off"):
        if forced_judge == "prefill":
            expected = [forced_mode_prefix(mode)] * 24
        else:  # the category's judge; the fixed one where the first pass closed no judge
            expected = [forced_mode_prefix(mode, DEFAULT_JUDGE[ex.category])
                        if ex.id != tasks[1].id else forced_mode_prefix(mode)
                        for ex in tasks for _ in range(3)]  # fmt: skip
        tail = forced_mode_prefix(mode).split("</judge>")[1]
        forced = [t.split("assistant\n<judge>\n")[1] for t in texts if t.endswith(tail)]
        assert forced == expected
    params = engine.calls[0][1]
    assert params.temperature == 0.7 and params.stop_token_ids == [7]
    assert len({p.seed for _, p in engine.calls}) == len(engine.calls)  # a seed per chunk

    summary = summarize(results, ks=(3,))
    n_hard = sum(ex.category == "hard" for ex in tasks)
    assert 0 < n_hard < 8
    for mode in ("auto", "think_on"):
        assert summary[mode]["overall"]["accuracy"] == 1.0
        assert summary[mode]["overall"]["format_valid_rate"] == 1.0
    assert summary["think_off"]["easy"]["accuracy"] == 1.0
    assert summary["think_off"]["hard"]["accuracy"] == pytest.approx(1 / 3)
    assert summary["think_off"]["hard"]["pass@3"] == pytest.approx(1.0)
    assert summary["auto"]["hard"]["think_on_rate"] == 1.0
    assert summary["auto"]["easy"]["think_on_rate"] == 0.0
    assert summary["think_off"]["overall"]["think_on_rate"] == 0.0
    # tokens: words of the completion, plus the words of the forced prefix in forced modes
    for ex in tasks:
        row = {r.mode: r for r in results if r.id == ex.id and r.sample == 0}
        auto = "think_on" if ex.category == "hard" else "think_off"
        auto_words = len(autothink_answer(ex, auto).removeprefix("<judge>\n").split())
        assert row["auto"].output_tokens == auto_words
        judge = DEFAULT_JUDGE[ex.category] if forced_judge == "model" else None
        if ex.id == tasks[1].id:
            judge = None
        on_words = len(f"{ex.reasoning}\n</think>\n\n<answer>\n{ex.answer}\n</answer>".split())
        prefix = forced_mode_prefix("think_on", *([judge] if judge else []))
        assert row["think_on"].output_tokens == on_words + len(prefix.split())
        if judge and ex.category == "hard":  # forced think_on with its own judge = auto's answer
            assert row["think_on"].output_tokens == row["auto"].output_tokens
            assert row["think_on"].output == row["auto"].output

    files = write_eval_outputs(tmp_path / "out", summary, results, {"ckpt": "fake"})
    doc = json.loads(files["eval.json"].read_text())
    assert doc["summary"]["think_off"]["hard"]["pass@3"] == pytest.approx(1.0)
    red = doc["token_reduction"]["overall"]
    assert red["think_on_tokens_mean"] == summary["think_on"]["overall"]["tokens_mean"]
    assert len(files["samples.jsonl"].read_text().splitlines()) == 72
    md = files["eval.md"].read_text()
    assert "| think_off | hard |" in md and "auto uses" in md and "![accuracy](accuracy.png)" in md
    for name in ("accuracy", "tokens"):
        assert files[name].read_bytes()[:8] == PNG_MAGIC


def test_write_report_from_synthetic_inputs(tmp_path):
    rows = [{"step": s, "reward/total": 0.1 * s, "reward/mode": 0.05 * s,
             "think_on_rate": 1.0 - 0.1 * s, "think_on_rate/easy": 1.0 - 0.2 * s,
             "think_on_rate/hard": 1.0} for s in range(1, 5)]  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)) + '{"step": 9, "to')
    cat = {"prompts": 4, "samples": 4, "accuracy": 0.5, "tokens_mean": 10.0, "tokens_p50": 9.0,
           "tokens_p90": 12.0, "think_on_rate": 0.25, "format_valid_rate": 1.0}  # fmt: skip
    on = {"summary": {"think_on": {"easy": {**cat, "tokens_mean": 20.0},
                                   "overall": {**cat, "tokens_mean": 20.0}}}}  # fmt: skip
    rest = tmp_path / "eval.json"
    rest.write_text(
        json.dumps(
            {
                "summary": {
                    "auto": {"easy": cat, "overall": cat},
                    "think_off": {"easy": cat, "overall": cat},
                }
            }
        )
    )
    path = write_report(
        tmp_path / "report",
        rl_metrics_jsonl=metrics,
        eval_json_by_mode={"think_on": on, "all": rest},
        extra_sections={"Where things are": "- teacher: runs/demo/teacher"},
    )
    md = path.read_text()
    assert "| think_off | easy | 4 | 0.500 |" in md
    assert "overall: auto uses 50.0% fewer tokens than think_on (10.0 vs 20.0)" in md
    assert "| reward/total | 0.1 | 0.4 |" in md  # first and last step, torn line skipped
    assert "| think_on_rate/easy | 0.8 | 0.2 |" in md
    assert "## Where things are" in md and "runs/demo/teacher" in md
    for png in ("accuracy.png", "tokens.png", "rl_reward.png", "rl_think_on_rate.png"):
        assert f"]({png})" in md
        assert (path.parent / png).read_bytes()[:8] == PNG_MAGIC
    # custom key names, none present: the plot is left out and said so
    other = write_report(tmp_path / "r2", rl_metrics_jsonl=metrics, reward_key="score")
    assert "(reward: no" in other.read_text() and not (tmp_path / "r2" / "rl_reward.png").exists()


def test_kat_eval_cli_on_tiny_checkpoint(tmp_path, kat):
    """The real CLI on two ranks (TP=2) on an untrained tiny checkpoint: outputs are complete
    and consistent with an independent re-scoring of samples.jsonl."""
    from kat_megatron.data.autothink import parse_lenient
    from kat_megatron.verifiers import get_verifier

    run = tmp_path / "init"
    kat(["train", "examples/tiny_pretrain/config.yaml", "training.steps=0", "parallel.tp=1",
         f"run.dir={run}", "logging.tensorboard=false"])  # fmt: skip
    tasks = make_tasks(6, seed=0)
    data = write_jsonl(tmp_path / "p.jsonl", [prompt_record(ex) for ex in tasks])
    out = tmp_path / "eval"
    proc = kat(["eval", "--ckpt", str(run / "checkpoints"), "--data", str(data), "--mode", "all",
                "--max-new-tokens", "12", "--out", str(out), "--no-progress"], nproc=2)  # fmt: skip
    assert "kat eval: wrote" in proc.stdout
    doc = json.loads((out / "eval.json").read_text())
    assert doc["meta"]["tp"] == 2 and set(doc["summary"]) == {"auto", "think_on", "think_off"}
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 18
    verifier = get_verifier("exact_match")
    ref = {ex.id: ex.answer for ex in tasks}
    for mode in ("auto", "think_on", "think_off"):
        mine = [r for r in rows if r["mode"] == mode]
        assert {r["id"] for r in mine} == set(ref)
        prefix = "<judge>\n" + ("" if mode == "auto" else forced_mode_prefix(mode))
        assert all(r["output"].startswith(prefix) for r in mine)
        correct = [verifier(parse_lenient(r["output"]).answer, ref[r["id"]]).correct for r in mine]
        assert doc["summary"][mode]["overall"]["accuracy"] == pytest.approx(sum(correct) / 6)
        assert all(1 <= r["output_tokens"] for r in mine)
    assert (out / "eval.md").is_file()
    assert (out / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert Path(out / "tokens.png").is_file()
