"""The oracle router, the frontier and auto's agreement with the oracle: `kat eval`'s code
(`run_eval` -> `summarize` -> `write_eval_outputs` -> `write_report`) driven by a scripted
engine whose per-prompt pass rates, token counts and auto choices are drawn at random and
known, against the same figures computed here from the script alone.

Reference: for each prompt, the forced mode with more correct samples (equal sample counts, so
pass rates compare as counts), on equal counts the one with fewer total tokens, think_off when
those tie too; accuracy = mean over prompts of correct/K, tokens = mean over samples. Exact
comparisons up to 1e-12 (float64 sums of at most 64 small integers and their ratios).
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict

import pytest

from kat_megatron.data.synthetic_steps import make_tasks, prompt_record, write_jsonl
from kat_megatron.eval.metrics import SampleResult, frontier, oracle_modes, summarize
from kat_megatron.eval.report import write_eval_outputs, write_report
from kat_megatron.eval.runner import EvalConfig, load_prompts, run_eval
from kat_megatron.inference.types import Completion

K = 4
"""Samples per prompt and mode."""
PREFIX_TOKENS = 3
"""What the test's `count_tokens` charges for any forced prefix."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOL = 1e-12


def make_script(tasks, seed: int) -> dict[str, dict]:
    """Per prompt id: correct flags and generated-token counts per forced mode and sample, and
    auto's (mode, correct, tokens) per sample (mode None: an answer without a mode token).
    Some prompts get equal forced pass rates, with equal or unequal tokens, to test ties."""
    rng = random.Random(seed)
    script = {}
    for i, ex in enumerate(tasks):
        c_on, c_off = rng.randint(0, K), rng.randint(0, K)
        if i % 4 == 0:  # a tie in pass rate
            c_off = c_on
        on = [j < c_on for j in range(K)]
        off = [j < c_off for j in range(K)]
        rng.shuffle(on), rng.shuffle(off)
        t_on = [rng.randint(20, 60) for _ in range(K)]
        t_off = [rng.randint(5, 15) for _ in range(K)]
        if i % 8 == 0:  # a tie where think_on is the cheaper forced mode
            t_on = [5] * K
            t_off = [9] * K
        if i % 12 == 4:  # a tie in pass rate and in tokens: think_off
            t_on, t_off = [7] * K, [7] * K
        auto = [
            (rng.choice(["think_on", "think_off", None]), rng.random() < 0.6, rng.randint(5, 60))
            for _ in range(K)
        ]
        script[ex.id] = {"think_on": (on, t_on), "think_off": (off, t_off), "auto": auto}
    return script


class ScriptedEngine:
    """Answers per the script: the k-th request for a prompt in a mode is its sample k; a
    correct answer is the reference, else "wrong"; token ids are as many as scripted."""

    def __init__(self, tasks, script) -> None:
        self.by_question = {ex.question: ex for ex in tasks}
        self.script = script
        self.seen: dict[tuple[str, str], int] = defaultdict(int)

    def generate_text(self, prompts, params):
        out = []
        for p in prompts:
            ex = self.by_question[re.search(r"user\n(.*?)<\|im_end\|>", p).group(1)]
            if "</judge>" in params.stop_strings:
                text, n = "Let me see.\n</judge>", 4
                out.append(Completion([1], [0] * n, [0.0] * n, text, "stop"))
                continue
            mode = ("think_on" if p.endswith("<think>\n") else
                    "think_off" if p.endswith("<answer>\n") else "auto")  # fmt: skip
            k = self.seen[(ex.id, mode)]
            self.seen[(ex.id, mode)] += 1
            if mode == "auto":
                chosen, right, n = self.script[ex.id]["auto"][k]
            else:
                flags, tokens = self.script[ex.id][mode]
                chosen, right, n = mode, flags[k], tokens[k]
            ans = ex.answer if right else "wrong"
            if mode == "think_on":
                text = f"r\n</think>\n\n<answer>\n{ans}\n</answer>"
            elif mode == "think_off":
                text = f"{ans}\n</answer>"
            elif chosen is None:
                text = f"J\n</judge>\n\n{ans}"
            else:
                body = "<think>\nr\n</think>\n\n" if chosen == "think_on" else ""
                text = f"J\n</judge>\n\n<{chosen}>\n{body}<answer>\n{ans}\n</answer>"
            out.append(Completion([1], [0] * n, [0.0] * n, text, "stop"))
        return out


def expected_frontier(tasks, script):
    """The oracle modes and `{category: {router: (prompts, accuracy, tokens_mean, agreement)}}`
    from the script alone."""
    oracle = {}
    for ex in tasks:
        (on, t_on), (off, t_off) = script[ex.id]["think_on"], script[ex.id]["think_off"]
        if sum(on) != sum(off):
            oracle[ex.id] = "think_on" if sum(on) > sum(off) else "think_off"
        else:
            oracle[ex.id] = "think_on" if sum(t_on) < sum(t_off) else "think_off"
    groups = defaultdict(list)
    for ex in tasks:
        groups[ex.category].append(ex)
        groups["overall"].append(ex)
    expect = {}
    for cat, exs in groups.items():
        rows = {}
        for router in ("think_off", "think_on", "oracle"):
            acc, toks = [], []
            for ex in exs:
                mode = oracle[ex.id] if router == "oracle" else router
                flags, tokens = script[ex.id][mode]
                acc.append(sum(flags) / K)
                toks += [t + PREFIX_TOKENS for t in tokens]
            rows[router] = (len(exs), sum(acc) / len(acc), sum(toks) / len(toks), None)
        autos = [(ex, a) for ex in exs for a in script[ex.id]["auto"]]
        acc = [sum(a[1] for a in script[ex.id]["auto"]) / K for ex in exs]
        agree = sum(a[0] == oracle[ex.id] for ex, a in autos) / len(autos)
        tokens = sum(a[2] for _, a in autos) / len(autos)
        rows["auto"] = (len(exs), sum(acc) / len(acc), tokens, agree)
        expect[cat] = rows
    return oracle, expect


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frontier")
    unique = {ex.question: ex for ex in reversed(make_tasks(60, seed=7))}  # the engine's keys
    tasks = list(unique.values())[:24]
    script = make_script(tasks, seed=11)
    path = write_jsonl(tmp / "p.jsonl", [prompt_record(ex) for ex in tasks])
    cfg = EvalConfig(modes=("auto", "think_on", "think_off"), samples=K, temperature=1.0,
                     chunk_size=10)  # fmt: skip
    results = run_eval(ScriptedEngine(tasks, script), load_prompts(path), cfg,
                       count_tokens=lambda text: PREFIX_TOKENS, progress=False)  # fmt: skip
    files = write_eval_outputs(tmp / "out", summarize(results), results, {"ckpt": "scripted"})
    return tasks, script, results, files


def test_oracle_modes_frontier_and_agreement_against_the_script(evaluated):
    tasks, script, results, files = evaluated
    oracle, expect = expected_frontier(tasks, script)
    # the script exercises every branch of the rule
    ties = [ex.id for ex in tasks if sum(script[ex.id]["think_on"][0]) ==
            sum(script[ex.id]["think_off"][0])]  # fmt: skip
    assert {oracle[i] for i in ties} == {"think_on", "think_off"}
    assert {oracle[ex.id] for ex in tasks if ex.id not in ties} == {"think_on", "think_off"}
    assert any(a[0] is None for s in script.values() for a in s["auto"])

    doc = json.loads(files["eval.json"].read_text())
    assert doc["oracle_modes"] == oracle == oracle_modes(results)
    front = doc["frontier"]
    assert list(front) == sorted({ex.category for ex in tasks}) + ["overall"]
    for cat, rows in expect.items():
        assert list(front[cat]) == ["think_off", "think_on", "oracle", "auto"]
        for router, (prompts, acc, tokens, _) in rows.items():
            got = front[cat][router]
            assert got["prompts"] == prompts and got["samples"] == prompts * K, (cat, router)
            assert got["accuracy"] == pytest.approx(acc, abs=TOL), (cat, router)
            assert got["tokens_mean"] == pytest.approx(tokens, abs=TOL), (cat, router)
        auto = front[cat]["auto"]
        assert auto["oracle_agreement"] == pytest.approx(rows["auto"][3], abs=TOL), cat
        assert auto["tokens_over_oracle"] == pytest.approx(rows["auto"][2] / rows["oracle"][2])
        # the oracle's think-on rate is the fraction of its prompts routed to think_on
        ids = [ex.id for ex in tasks if cat in (ex.category, "overall")]
        routed_on = sum(oracle[i] == "think_on" for i in ids) / len(ids)
        assert front[cat]["oracle"]["think_on_rate"] == pytest.approx(routed_on, abs=TOL)
        # the agreement is also a metric of auto in the summary
        assert doc["summary"]["auto"][cat]["oracle_agreement"] == auto["oracle_agreement"]
    # the oracle is never worse than either forced mode
    for cat in expect:
        best = max(front[cat]["think_on"]["accuracy"], front[cat]["think_off"]["accuracy"])
        assert front[cat]["oracle"]["accuracy"] >= best - TOL


def test_frontier_table_and_plot_in_eval_md_and_report(evaluated, tmp_path):
    tasks, script, results, files = evaluated
    _, expect = expected_frontier(tasks, script)
    md = files["eval.md"].read_text()
    assert "## Frontier: accuracy against tokens" in md and "![frontier](frontier.png)" in md
    assert files["frontier"].read_bytes()[:8] == PNG_MAGIC
    n, acc, tokens, agree = expect["overall"]["auto"]
    on = expect["overall"]["oracle"]
    row = f"| overall | auto | {n} | {acc:.3f} | {tokens:.1f} | "
    assert row in md and f"| {agree:.3f} | {tokens / on[2]:.2f} |" in md
    assert f"| overall | oracle | {on[0]} | {on[1]:.3f} | {on[2]:.1f} |" in md
    report = write_report(tmp_path / "r", eval_json_by_mode={"all": files["eval.json"]})
    text = report.read_text()
    assert "### Frontier: accuracy against tokens" in text and row in text
    assert "](frontier.png)" in text
    assert (tmp_path / "r" / "frontier.png").read_bytes()[:8] == PNG_MAGIC


def _s(pid, mode, correct, tokens, parsed=None, cat="c"):
    return SampleResult(pid, cat, mode, 0, "", "", correct, True, parsed or mode, tokens, "stop")


def test_oracle_rule_on_unequal_sample_counts_and_missing_modes(tmp_path):
    rows = [
        # a: think_on 2 of 4, think_off 1 of 2: equal rates; think_on's mean tokens 10 < 12
        # (though its total, 40, is more than think_off's 24)
        *[_s("a", "think_on", i < 2, 10) for i in range(4)],
        _s("a", "think_off", True, 12), _s("a", "think_off", False, 12),
        # b: think_on 2 of 3 > think_off 2 of 4 (equal counts), though think_off is cheaper
        *[_s("b", "think_on", i < 2, 30) for i in range(3)],
        *[_s("b", "think_off", i < 2, 5) for i in range(4)],
        # c: only think_on was sampled: no oracle, left out of the frontier
        _s("c", "think_on", True, 8), _s("c", "auto", True, 8, "think_on"),
        _s("a", "auto", True, 10, "think_on"), _s("b", "auto", True, 6, "think_off"),
    ]  # fmt: skip
    assert oracle_modes(rows) == {"a": "think_on", "b": "think_on"}
    front = frontier(rows)
    assert front["overall"]["auto"]["prompts"] == 2  # c is left out
    assert front["overall"]["auto"]["oracle_agreement"] == pytest.approx(0.5)
    # oracle accuracy: mean over a, b of their think_on pass rates (2/4, 2/3)
    assert front["overall"]["oracle"]["accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert front["overall"]["oracle"]["tokens_mean"] == pytest.approx((4 * 10 + 3 * 30) / 7)
    forced_only = frontier([r for r in rows if r.mode != "auto"])
    assert list(forced_only["overall"]) == ["think_off", "think_on", "oracle"]
    # without both forced modes there is no frontier, and eval.json has no frontier keys
    auto_only = [r for r in rows if r.mode == "auto"]
    assert frontier(auto_only) == {} and oracle_modes(auto_only) == {}
    files = write_eval_outputs(tmp_path, summarize(auto_only), auto_only, {})
    doc = json.loads(files["eval.json"].read_text())
    assert "frontier" not in doc and "oracle_agreement" not in doc["summary"]["auto"]["overall"]
    assert "frontier" not in files
