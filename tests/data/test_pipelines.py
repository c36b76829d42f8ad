"""`kat data tag/synthesize/coldstart` against a real OpenAI-compatible server on loopback.

The server (`ScriptedLLMServer`, a `ThreadingHTTPServer` on 127.0.0.1) answers from a script
keyed on model name, query and seed, and counts every request it answers, so resume tests can
assert that no answered request is ever sent twice.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kat_megatron.data import pipelines
from kat_megatron.data.autothink import parse_strict
from kat_megatron.data.scripted_server import ScriptedLLMServer

REPO = Path(__file__).resolve().parents[2]

# query -> (reference, easy?, verifier)
WORLD = {
    "What is 2 + 3?": ("5", True, "math"),
    "What is 7 + 1?": ("8", True, "math"),
    "Name the capital of France.": ("Paris", True, "exact_match"),
    "Compute 17 * 23.": ("391", False, "math"),
    "Compute 19 * 21.": ("399", False, "math"),
    "Prove that 1 = 2.": ("0", False, "math"),  # nobody gets it right: unsolved
}


def _query(text: str) -> str:
    return next(q for q in WORLD if q in text)


def _boxed(x: str) -> str:
    return f"The answer is \\boxed{{{x}}}."


def _chat(model: str, text: str, seed: int) -> str | dict:
    q = _query(text)
    ref, easy, _ = WORLD[q]
    wrong = _boxed("1234")
    unsolvable = q.startswith("Prove")
    if model == "on-teacher":
        return {
            "reasoning_content": "Let me work it out.",
            "content": wrong if unsolvable else _boxed(ref),
        }
    if model == "off-teacher":
        return _boxed(ref) if (easy or seed % 2) and not unsolvable else wrong
    if model == "judge":
        return "THINK_OFF" if easy else "I would say think_on."
    if model == "solver":
        return wrong if unsolvable or (q == "Compute 19 * 21." and seed == 0) else _boxed(ref)
    if model == "thinker":
        return f"Multiply step by step; the result is {ref}." + (
            " (revised)" if "reviewer" in text else ""
        )
    if model == "critic":
        return (
            "Too terse.\nSCORE: 3" if q == "Compute 17 * 23." and seed == 0 else "Good.\nSCORE: 9"
        )
    if model == "direct":
        return wrong if unsolvable or (q == "What is 7 + 1?" and seed == 0) else _boxed(ref)
    if model == "intent":
        return "Factual." if "capital" in q else "This is math."
    if model == "writer":
        intent = re.search(r"intent is '([^']+)'", text).group(1)
        if q == "What is 2 + 3?" and seed == 0:
            return "Let me <think> about it."  # malformed: holds a special token
        how = "reason step by step" if "think-on" in text else "answer directly"
        return f"This {intent} query is best handled if I {how}."
    raise AssertionError(f"unscripted model {model!r}")


def script(path: str, body: dict) -> str | dict:
    if path.endswith("/chat/completions"):
        return _chat(body["model"], body["messages"][-1]["content"], body.get("seed", 0))
    q = _query(body["prompt"])  # /completions with a prefilled mode (sampling=prefill)
    ref = WORLD[q][0]
    if body["prompt"].endswith("<think>\n"):
        return f"Working.\n</think>\n\n<answer>\n\\boxed{{{ref}}}\n</answer>"
    return "\\boxed{1234}\n</answer>"


def _write_input(path: Path, extra_lines: list[str] = ()) -> Path:
    lines = [
        json.dumps({"id": f"q{i}", "query": q, "reference": ref, "verifier": v, "source": "test"})
        for i, (q, (ref, _, v)) in enumerate(WORLD.items())
    ]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


def _base(server: ScriptedLLMServer, inp: Path, out: Path) -> dict:
    return {
        "input": str(inp),
        "output": str(out),
        "progress": False,
        "client": {"base_url": server.base_url, "max_concurrency": 2, "backoff_initial_s": 0.01},
    }


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def server():
    with ScriptedLLMServer(script) as s:
        yield s


def _tag_cfg(server, inp, out, **kw) -> dict:
    cfg = _base(server, inp, out)
    cfg.update({"samples_per_mode": 2, "judge": {"model": "judge"}, **kw})
    cfg["think_on"], cfg["think_off"] = {"model": "on-teacher"}, {"model": "off-teacher"}
    return cfg


def _run(name: str, cfg: dict) -> dict:
    """Run pipeline `name` in-process with `cfg` given as dotted overrides (as the CLI would)."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in cfg.items()]
    return pipelines.run(name, None, overrides)


def test_tag_oracle_agreement_is_measured(server, tmp_path):
    """`oracle`: labels compared with many more forced-mode samples of the same teacher. The
    scripted off-teacher is right on hard queries for odd seeds only (pass rate 0.5), the
    on-teacher always: with margin 0.6 (and no judge) the labels say think_off on the two
    solvable hard queries where the oracle (margin 0, ties to think_off) says think_on."""
    inp = tmp_path / "q.jsonl"
    inp.write_text("".join(
        json.dumps({"id": f"q{i}", "query": q, "reference": ref, "verifier": v,
                    "category": "easy" if easy else "hard"}) + "\n"
        for i, (q, (ref, easy, v)) in enumerate(WORLD.items())
    ))  # fmt: skip
    cfg = _tag_cfg(server, inp, tmp_path / "tag", margin=0.6, judge=None)
    summary = _run("tag", {**cfg, "oracle": {"samples_per_mode": 4}})
    assert server.answered == 6 * 2 * 2 + 6 * 2 * 4  # tagging samples, then the oracle's
    rows = {r["query"]: r for r in _jsonl(tmp_path / "tag" / "data.jsonl")}
    hard = rows["Compute 17 * 23."]
    assert hard["mode"] == "think_off"
    assert hard["oracle"] == {"mode": "think_on", "p_on": 1.0, "p_off": 0.5, "samples": 4}
    assert rows["What is 2 + 3?"]["oracle"]["mode"] == "think_off"  # 1.0 vs 1.0: the cheaper
    assert summary["oracle_agreement"] == {
        "overall": round(4 / 6, 4),
        "by_category": {"easy": 1.0, "hard": round(1 / 3, 4)},
        "confusion": {"think_off->think_off": 4, "think_off->think_on": 2},
        "oracle_think_on_rate": round(2 / 6, 4),
        "n": 6,
    }
    with pytest.raises(ValueError, match="oracle.samples_per_mode=0"):
        _run("tag", {**cfg, "oracle": {"samples_per_mode": 0}})


def test_tag_synthesize_coldstart_chain(server, tmp_path):
    import datasets

    inp = _write_input(tmp_path / "queries.jsonl")
    tag = _run("tag", _tag_cfg(server, inp, tmp_path / "tag"))
    rows = {r["query"]: r for r in _jsonl(tmp_path / "tag" / "data.jsonl")}
    assert server.answered == 6 * (2 * 2 + 1)
    assert rows["What is 2 + 3?"]["mode"] == "think_off"  # tie at 1.0 goes to think-off
    hard = rows["Compute 17 * 23."]
    assert (hard["mode"], hard["p_on"], hard["p_off"]) == ("think_on", 1.0, 0.5)
    assert hard["votes"] == {"think_on": [1, 1], "think_off": [0, 1]}
    assert hard["judge_vote"] == "think_on" and hard["meta"] == {"source": "test"}
    assert rows["Prove that 1 = 2."]["unsolved"] is True
    assert tag["counts"] == dict(
        lines=6, malformed=0, records=6, processed=6, kept=6, rejected=0, failed=0
    )
    assert tag["mode_counts"] == {"think_on": 3, "think_off": 3} and tag["unsolved"] == 1
    assert tag["length_unit"] == "chars" and tag["length_percentiles"]["think_on"]["count"] == 12

    syn_cfg = _base(server, tmp_path / "tag" / "data.jsonl", tmp_path / "syn")
    for role in ("solver", "thinker", "critic", "direct"):
        syn_cfg[role] = {"model": role}
    before = server.answered
    syn = _run("synthesize", syn_cfg)
    assert server.answered - before == 1 + 2 + 1 + 5 + 4 + 3
    kept = {r["query"]: r for r in _jsonl(tmp_path / "syn" / "data.jsonl")}
    assert kept["Compute 17 * 23."]["critic_scores"] == [3.0, 9.0]  # regenerated once
    assert kept["Compute 17 * 23."]["think"].endswith("(revised)")
    assert kept["Compute 19 * 21."]["rounds"] == 2 and kept["What is 7 + 1?"]["rounds"] == 2
    assert kept["What is 2 + 3?"]["think"] is None
    (rej,) = _jsonl(tmp_path / "syn" / "rejected.jsonl")
    assert rej["query"] == "Prove that 1 = 2." and rej["reason"] == "no verified solver answer"
    assert syn["rejected_reasons"] == {"no verified solver answer": 1}
    assert syn["events"] == {"critic_unparsed": 0, "direct_wrong": 1, "solver_wrong": 4}

    cs_cfg = _base(server, tmp_path / "syn" / "data.jsonl", tmp_path / "cs")
    cs_cfg.update(
        judge_writer={"model": "writer"}, intent_classifier={"model": "intent"}, tokenizer="tiny"
    )
    cs = _run("coldstart", cs_cfg)
    examples = _jsonl(tmp_path / "cs" / "data.jsonl")
    assert len(examples) == 5 and cs["events"] == {"malformed_outputs": 1}
    for ex in examples:
        resp = parse_strict(ex["messages"][-1]["content"])
        assert (resp.mode, resp.answer, resp.think) == (ex["mode"], ex["answer"], ex["think"])
        assert f"This {ex['intent']} query" in resp.judge
        assert ex["messages"][0] == {"role": "user", "content": ex["query"]}
    assert cs["mode_ratio"] == {"think_on": 0.4, "think_off": 0.6}
    assert cs["intent_counts"] == {"factual": 1, "math": 4}
    assert cs["length_unit"] == "tokens" and cs["length_percentiles"]["think_off"]["count"] == 3

    ds = datasets.load_from_disk(str(tmp_path / "cs" / "dataset"))
    assert len(ds) == 5 and json.loads(ds[0]["reference"]) == examples[0]["reference"]
    assert ds[0]["messages"] == examples[0]["messages"]
    from transformers import AutoTokenizer

    from kat_megatron.data.packing import pack_examples, tokenize_chat
    from kat_megatron.data.pipelines.io import TINY_DIR

    tok = AutoTokenizer.from_pretrained(str(TINY_DIR))
    packed = pack_examples([tokenize_chat(tok, ex["messages"]) for ex in examples], 512, pad_id=0)
    assert sum(len(r.example_indices) for r in packed.sequences) == 5


def test_malformed_records_are_counted_with_line_numbers(server, tmp_path):
    bad = [
        '{"query": "What is 2 + 3?"',  # line 7: truncated JSON
        '["not", "an", "object"]',
        "",
        '{"id": "q0", "query": "What is 2 + 3?", "reference": "5"}',
        '{"query": "What is 2 + 3?"}',
        '{"query": "What is 2 + 3?", "reference": "5", "verifier": "maths"}',
        '{"messages": [{"role": "assistant", "content": "hi"}], "reference": "1"}',
    ]
    inp = _write_input(tmp_path / "in.jsonl", bad)
    cfg = _tag_cfg(server, inp, tmp_path / "out", limit=2)
    summary = _run("tag", cfg)
    lines = {m["line"]: m["reason"] for m in summary["malformed"]}
    assert sorted(lines) == list(range(7, 14))
    assert lines[7].startswith("invalid JSON") and "got list" in lines[8]
    assert lines[9] == "empty line" and "duplicate id 'q0' (first on line 1)" in lines[10]
    assert "missing 'reference'" in lines[11] and "unknown verifier 'maths'" in lines[12]
    assert "end with a user turn" in lines[13]
    assert summary["counts"]["malformed"] == 7 and summary["counts"]["processed"] == 2
    # Changing what a record produces refuses to mix with the old work log.
    with pytest.raises(ValueError, match="different config; pass resume=false"):
        _run("tag", {**cfg, "samples_per_mode": 3})
    assert _run("tag", {**cfg, "samples_per_mode": 3, "resume": False})["counts"]["kept"] == 2


def test_resume_after_kill_sends_no_repeated_requests(server, tmp_path):
    inp = _write_input(tmp_path / "q.jsonl")
    cfg = _tag_cfg(server, inp, tmp_path / "out")
    del cfg["judge"]
    cfg_path = tmp_path / "tag.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    server.block_after = 9  # answer 9 requests, then hang until killed
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kat_megatron.cli", "data", "tag", str(cfg_path)],
        cwd=REPO, stdout=log, stderr=log,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while server.n_blocked < 2:  # both workers wait: every earlier answer is cached
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the pipeline never reached the interruption point"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    server.release()
    assert server.answered == 9 and not (tmp_path / "out" / "summary.json").exists()

    summary = pipelines.run("tag", str(cfg_path))
    assert server.answered == 6 * 2 * 2
    assert max(server.answered_by_key.values()) == 1  # nothing answered twice
    assert summary["requests"]["sent"] == 24 - 9 and summary["counts"]["kept"] == 6
    assert len(_jsonl(tmp_path / "out" / "data.jsonl")) == 6
    # A third run finds everything done and sends nothing.
    assert pipelines.run("tag", str(cfg_path))["requests"]["sent"] == 0
    assert server.answered == 24


def test_prefill_sampling_and_cli_errors(server, tmp_path, capsys):
    from kat_megatron.cli import main

    inp = tmp_path / "q.jsonl"
    inp.write_text(json.dumps({"query": "Compute 17 * 23.", "reference": "391"}) + "\n")
    cfg = _tag_cfg(server, inp, tmp_path / "out", sampling="prefill")
    del cfg["judge"]
    summary = _run("tag", cfg)
    (row,) = _jsonl(tmp_path / "out" / "data.jsonl")
    assert (row["p_on"], row["p_off"], row["mode"]) == (1.0, 0.0, "think_on")
    assert summary["requests"]["sent"] == 4
    prompt = server.bodies[0][1]["prompt"]
    prefill = "I will decide how to answer this query.\n</judge>\n\n<think_on>\n<think>\n"
    assert prompt.endswith("<|im_start|>assistant\n<judge>\n" + prefill)

    cfg_path = tmp_path / "tag.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "tag", str(cfg_path), "samples_per_mod=3"]) == 2
    assert "did you mean 'samples_per_mode'" in capsys.readouterr().err
    assert main(["data", "tag", str(cfg_path), "think_on.temperature=9"]) == 2
    assert "think_on.temperature=9.0: expected 0..2" in capsys.readouterr().err
    assert main(["data", "synthesize", str(cfg_path)]) == 2
    assert "unknown key 'samples_per_mode'" in capsys.readouterr().err


OWN_JUDGE = "Steps help here."


def _own_judge_model(bodies: list, reasoning: str):
    """A scripted AutoThink model (`/completions`) that answers 17 * 23 right only after its own
    judge `OWN_JUDGE` (the demo teacher's failure after a fixed text it never wrote); asked at
    `<judge>`, it writes that judge (the server would stop at </judge>). Request bodies are
    appended to `bodies`."""

    def autothink(path, body):
        bodies.append(body)
        prompt = body["prompt"]
        if prompt.endswith("<judge>\n"):
            return f"{OWN_JUDGE}\n</judge>\n\n<think_on>"
        good = f"<judge>\n{OWN_JUDGE}\n</judge>" in prompt
        ans = "\\boxed{391}" if good else "\\boxed{1}"
        if prompt.endswith("<think>\n"):
            return f"{reasoning}\n</think>\n\n<answer>\n{ans}\n</answer>"
        return f"{ans}\n</answer>"

    return autothink


def test_prefill_with_the_models_own_judge(server, tmp_path):
    """`prefill_judge: null`: sample i asks for the model's judge first (stopped at </judge>,
    the same request for both modes) and forces each mode after it. The scripted model is right
    after its own judge only (the demo teacher's failure after a fixed text it never wrote):
    both modes pass with its judge, where the fixed prefill makes them fail."""
    own, bodies = OWN_JUDGE, []
    server.script = _own_judge_model(bodies, "Working.")
    inp = tmp_path / "q.jsonl"
    inp.write_text(json.dumps({"query": "Compute 17 * 23.", "reference": "391"}) + "\n")
    for judge, expect in ((None, (1.0, 1.0)), ("I will decide how to answer this query.", (0, 0))):
        bodies.clear()
        out = tmp_path / f"out_{judge is None}"
        cfg = _tag_cfg(server, inp, out, sampling="prefill", prefill_judge=judge)
        del cfg["judge"]
        _run("tag", cfg)
        (row,) = _jsonl(out / "data.jsonl")
        assert (row["p_on"], row["p_off"]) == expect, judge
        judges = [b for b in bodies if b["prompt"].endswith("<judge>\n")]
        if judge is None:
            # one judge request per sample index (seeds differ), shared by the two modes
            assert sorted(b["seed"] for b in judges) == [0, 1]
            assert all("</judge>" in b["stop"] and b["max_tokens"] == 32 for b in judges)
            forced = [b["prompt"] for b in bodies if b not in judges]
            assert len(forced) == 4
            assert all(f"<judge>\n{own}\n</judge>\n\n<think_o" in p for p in forced)
        else:
            assert not judges


def test_synthesize_prefill_with_the_models_own_judge(server, tmp_path):
    """`kat data synthesize sampling=prefill`: the solver and direct teacher are one AutoThink
    model forced into the record's mode after its own judge (as `kat data tag`); the think text
    is its own reasoning. The scripted model is right after its own judge only, so the fixed
    judge text (what `kat serve`'s chat template prefills) leaves every record unverified."""
    bodies: list = []
    server.script = _own_judge_model(bodies, "Multiply 17 by 23.")
    rows = [
        {"id": "on", "query": "Compute 17 * 23.", "reference": "391", "mode": "think_on"},
        {"id": "off", "query": "Compute 17 * 23.", "reference": "391", "mode": "think_off"},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for judge in (None, "I will decide how to answer this query."):
        bodies.clear()
        out = tmp_path / f"syn_{judge is None}"
        cfg = _base(server, inp, out)
        cfg.update(
            sampling="prefill", prefill_judge=judge, thinker=None, critic=None,
            solver={"model": "teacher"}, direct={"model": "teacher"}, max_rounds=2,
            direct_samples=2,
        )  # fmt: skip
        syn = _run("synthesize", cfg)
        kept = {r["id"]: r for r in _jsonl(out / "data.jsonl")}
        if judge is None:
            assert not syn["rejected_reasons"] and set(kept) == {"on", "off"}
            assert (kept["on"]["think"], kept["on"]["answer"]) == (
                "Multiply 17 by 23.",
                "\\boxed{391}",
            )
            assert (kept["off"]["think"], kept["off"]["answer"]) == (None, "\\boxed{391}")
            judges = [b for b in bodies if b["prompt"].endswith("<judge>\n")]
            assert len(judges) == 2 and all("</judge>" in b["stop"] for b in judges)
        else:
            assert not kept and syn["rejected_reasons"] == {
                "no verified solver answer": 1, "no verified direct answer": 1
            }  # fmt: skip
            assert not [b for b in bodies if b["prompt"].endswith("<judge>\n")]
            assert len(bodies) == 4  # 2 rounds + 2 direct samples, each re-asked

    with pytest.raises(ValueError, match="sampling=prefill: expected thinker: null"):
        from kat_megatron.data.pipelines.synthesize import SynthesizeConfig

        SynthesizeConfig(input="x", output="y", sampling="prefill")


def test_solver_reasoning_no_critic_and_template_judge(server, tmp_path):
    """thinker/critic null: the solver's `reasoning_content` is the think text and the verified
    answer is the only gate; judge_writer null: the judge is `judge_template`; `extra_body`
    fields reach the request body."""
    seen = []
    inner = server.script

    def spy(path, body):
        seen.append(body)
        return inner(path, body)

    server.script = spy
    rows = [
        {"id": "a", "query": "Compute 17 * 23.", "reference": "391", "verifier": "math",
         "mode": "think_on", "intent": "math"},
        {"id": "b", "query": "Prove that 1 = 2.", "reference": "0", "verifier": "math",
         "mode": "think_on"},
    ]  # fmt: skip
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _base(server, inp, tmp_path / "syn")
    extra = {"chat_template_kwargs": {"think_mode": "think_on"}}
    cfg.update(solver={"model": "on-teacher", "extra_body": extra}, thinker=None, critic=None)
    syn = _run("synthesize", cfg)
    (kept,) = _jsonl(tmp_path / "syn" / "data.jsonl")
    assert (kept["think"], kept["answer"]) == ("Let me work it out.", "The answer is \\boxed{391}.")
    assert kept["critic_scores"] == [] and kept["rounds"] == 1
    assert syn["rejected_reasons"] == {"no verified solver answer": 1}
    assert all(b["chat_template_kwargs"] == {"think_mode": "think_on"} for b in seen)

    cs_cfg = _base(server, tmp_path / "syn" / "data.jsonl", tmp_path / "cs")
    cs_cfg.update(judge_writer=None)
    before = server.answered
    _run("coldstart", cs_cfg)
    assert server.answered == before  # no model call at all
    (ex,) = _jsonl(tmp_path / "cs" / "data.jsonl")
    judge = parse_strict(ex["messages"][-1]["content"]).judge
    assert judge == (
        "This is a math query that needs careful step-by-step reasoning, so I will think step "
        "by step (think-on)."
    )

    cs_cfg.update(judge_templates={"think_on": "A {intent} query: steps."})
    _run("coldstart", {**cs_cfg, "output": str(tmp_path / "cs2")})
    (ex,) = _jsonl(tmp_path / "cs2" / "data.jsonl")
    assert parse_strict(ex["messages"][-1]["content"]).judge == "A math query: steps."


def test_judge_templates_are_checked():
    from kat_megatron.data.pipelines.coldstart import ColdstartConfig

    with pytest.raises(ValueError, match=r"judge_templates: unknown mode\(s\) \['think_maybe'\]"):
        ColdstartConfig(input="x", output="y", judge_templates={"think_maybe": "x"})
    with pytest.raises(ValueError, match=r"judge_templates.think_off: expected a string"):
        ColdstartConfig(input="x", output="y", judge_templates={"think_off": "{mood}"})
