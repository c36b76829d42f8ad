"""Standard eval sets (`kat_megatron/eval/datasets.py`): GSM8K-, MATH- and code-style rows in
JSONL, parquet and saved `datasets` folders, mapped with `--field`, their references extracted
and checked by the real verifiers; error messages, malformed-row reports, and `kat eval`'s
argument handling up to the point where it needs a checkpoint. All data is written here."""

from __future__ import annotations

import argparse
import json
import logging
import re

import pytest

from kat_megatron.eval.datasets import (
    EvalDataConfig,
    extract_reference,
    last_boxed,
    load_eval_data,
    parse_fields,
)
from kat_megatron.eval.runner import load_prompts
from kat_megatron.verifiers import VERIFIERS, get_verifier

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def kat_log(caplog, monkeypatch):
    """caplog on the `kat` logger (which `setup_logging` may have stopped propagating)."""
    monkeypatch.setattr(logging.getLogger("kat"), "propagate", True)
    caplog.set_level(logging.INFO, logger="kat")
    return caplog


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist reads row 0's keys
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


GSM8K = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24.\n48 + 24 = <<48+24=72>>72\n#### 72"},
    {"question": "A farm has 1,000 hens and buys 234 more. How many hens?",
     "answer": "1,000 + 234 = 1,234 #### 2 then\n#### 1,234"},
]  # fmt: skip


def test_gsm8k_jsonl_question_answer(tmp_path):
    path = _jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K)
    cfg = EvalDataConfig(path, fields=parse_fields(["query=question", "reference=answer"]),
                         reference_format="gsm8k", verifier="math")  # fmt: skip
    a, b = load_eval_data(cfg)
    assert (a.id, a.category, a.verifier, a.reference) == ("gsm8k_test-0", "gsm8k_test", "math",
                                                           "72")  # fmt: skip
    assert a.messages == [{"role": "user", "content": GSM8K[0]["question"]}]
    assert (b.id, b.reference) == ("gsm8k_test-1", "1234")  # after the last ####, no commas
    math = get_verifier("math")
    assert math("So she sold \\boxed{72} clips.", a.reference).correct
    assert not math("So she sold \\boxed{71} clips.", a.reference).correct
    assert math("The farm has 1234 hens.", b.reference).correct
    # the same rows through `load_prompts` and with --category; exact_match also scores them
    (p, _) = load_prompts(EvalDataConfig(path, fields={"query": "question", "reference": "answer"},
                                         reference_format="gsm8k", category="gsm8k"))  # fmt: skip
    assert (p.category, p.verifier) == ("gsm8k", "exact_match")
    assert get_verifier(p.verifier)("72", p.reference).correct


def test_math_parquet_boxed_with_nested_braces(tmp_path):
    rows = [
        {"problem": "What is 1/2 as a fraction?",
         "solution": "We write $\\boxed{0}$ first, then fix it: $\\boxed{\\frac{1}{2}}$."},
        {"problem": "The set of roots?", "solution": "It is \\boxed{\\{1, 2\\}}."},
        {"problem": "Simplify $\\sqrt{8}$.", "solution": "$\\boxed{2\\sqrt{2}}$"},
    ]  # fmt: skip
    path = _parquet(tmp_path / "math500.parquet", rows)
    cfg = EvalDataConfig(path, fields={"query": "problem", "reference": "solution"},
                         reference_format="boxed", verifier="math")  # fmt: skip
    half, roots, root8 = load_eval_data(cfg)
    assert half.reference == "\\frac{1}{2}" and half.id == "math500-0" and half.line == 0
    assert roots.reference == "\\{1, 2\\}"
    assert root8.reference == "2\\sqrt{2}"
    math = get_verifier("math")
    assert math("so the answer is $\\boxed{\\frac{1}{2}}$", half.reference).correct
    assert math("the answer is \\boxed{0.5}", half.reference).correct
    assert not math("the answer is \\boxed{\\frac{1}{3}}", half.reference).correct
    assert math("\\boxed{2\\sqrt{2}}", root8.reference).correct
    assert last_boxed("\\boxed{\\frac{a}{b}} and \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None  # unbalanced
    assert extract_reference("no marker", "raw") == "no marker"
    with pytest.raises(ValueError, match="no balanced"):
        extract_reference("the answer is 3", "boxed")
    with pytest.raises(ValueError, match="no '####'"):
        extract_reference("the answer is 3", "gsm8k")


def test_saved_dataset_dict_splits(tmp_path):
    import datasets

    rows = {"train": [{"q": "train 1?", "a": "1"}, {"q": "train 2?", "a": "2"}],
            "test": [{"q": "test 3?", "a": "3"}]}  # fmt: skip
    folder = tmp_path / "toy"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(
        str(folder)
    )
    fields = {"query": "q", "reference": "a"}
    (p,) = load_eval_data(EvalDataConfig(folder, fields=fields))  # default: test
    assert (p.id, p.category, p.reference) == ("toy-0", "toy", "3")
    train = load_eval_data(EvalDataConfig(folder, fields=fields, split="train"))
    assert [x.reference for x in train] == ["1", "2"]
    with pytest.raises(ValueError, match=r"--split dev: .*splits: \['test', 'train'\]"):
        load_eval_data(EvalDataConfig(folder, fields=fields, split="dev"))
    two = tmp_path / "two"
    datasets.DatasetDict({k: datasets.Dataset.from_list(rows["train"]) for k in ("a", "b")}
                         ).save_to_disk(str(two))  # fmt: skip
    with pytest.raises(ValueError, match=r"has splits \['a', 'b'\]: choose one with --split"):
        load_eval_data(EvalDataConfig(two, fields=fields))
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows["train"]).save_to_disk(str(single))
    assert len(load_eval_data(EvalDataConfig(single, fields=fields))) == 2
    with pytest.raises(ValueError, match="holds one dataset"):
        load_eval_data(EvalDataConfig(single, fields=fields, split="test"))


def test_kat_data_output_folder_with_json_references(tmp_path):
    """`kat data` pipelines save `reference` as JSON text in dataset/ (`write_outputs`)."""
    from kat_megatron.data.pipelines.io import write_outputs

    rows = [{"id": "t0", "query": "1 + 1?", "messages": [{"role": "user", "content": "1 + 1?"}],
             "reference": "2", "verifier": "math"},
            {"id": "t1", "query": "add", "messages": [{"role": "user", "content": "add"}],
             "reference": {"tests": ["assert add(1, 2) == 3"]}, "verifier": "code"}]  # fmt: skip
    write_outputs(tmp_path / "tagged", rows, [], {}, progress=False)
    a, b = load_eval_data(EvalDataConfig(tmp_path / "tagged" / "dataset", reference_format="json"))
    assert (a.id, a.verifier, a.reference, a.category) == ("t0", "math", "2", "dataset")
    assert (b.verifier, b.reference) == ("code", {"tests": ["assert add(1, 2) == 3"]})


def test_parquet_folder_of_hub_shards(tmp_path):
    folder = tmp_path / "gsm8k" / "main"
    folder.mkdir(parents=True)
    _parquet(folder / "train-00000-of-00001.parquet", GSM8K[:1])
    _parquet(folder / "test-00000-of-00002.parquet", GSM8K[:1])
    _parquet(folder / "test-00001-of-00002.parquet", GSM8K[1:])
    fields = {"query": "question", "reference": "answer"}
    test = load_eval_data(EvalDataConfig(tmp_path / "gsm8k", fields=fields,
                                         reference_format="gsm8k"))  # fmt: skip
    assert [p.reference for p in test] == ["72", "1234"] and test[0].id == "gsm8k-0"
    train = load_eval_data(EvalDataConfig(folder, fields=fields, split="train",
                                          reference_format="gsm8k"))  # fmt: skip
    assert [p.reference for p in train] == ["72"]


def test_code_set_reference_is_verified_by_the_code_verifier(tmp_path):
    mbpp = [{"task_id": 11, "text": "Write a function add(a, b) returning a + b.",
             "test_list": ["assert add(1, 2) == 3", "assert add(2, 3) == 5"],
             "test_imports": []}]  # fmt: skip
    humaneval = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
                  "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
                  "entry_point": "add"}]  # fmt: skip
    (m,) = load_eval_data(EvalDataConfig(
        _parquet(tmp_path / "mbpp.parquet", mbpp), verifier="code",
        fields={"id": "task_id", "query": "text", "reference": "test_list",
                "test_setup": "test_imports"}))  # fmt: skip
    assert m.id == "11" and m.verifier == "code"
    assert m.reference == {"tests": mbpp[0]["test_list"]}
    (h,) = load_eval_data(EvalDataConfig(
        _jsonl(tmp_path / "HumanEval.jsonl", humaneval), verifier="code",
        fields={"id": "task_id", "query": "prompt", "reference": "test"}))  # fmt: skip
    assert h.id == "HumanEval/0" and h.reference["tests"][0].endswith("check(add)\n")
    code = get_verifier("code")
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a * b\n```"
    for p in (m, h):
        right, wrong = code(good, p.reference), code(bad, p.reference)
        assert (right.error, right.score, right.correct) == (None, 1.0, True), right
        assert (wrong.error, wrong.score, wrong.correct) == (None, 0.0, False), wrong


def test_mapping_and_option_errors(tmp_path):
    path = _parquet(tmp_path / "gsm.parquet", GSM8K)
    with pytest.raises(ValueError) as err:
        load_eval_data(EvalDataConfig(path, fields={"query": "question", "reference": "solution"}))
    msg = str(err.value)
    assert "reference=solution" in msg and str(path) in msg and "['answer', 'question']" in msg
    with pytest.raises(ValueError, match=r"no 'reference' column .*--field reference=COLUMN"):
        load_eval_data(EvalDataConfig(path, fields={"query": "question"}))
    with pytest.raises(ValueError) as err:
        EvalDataConfig(path, verifier="nope")
    assert "'nope'" in str(err.value) and all(name in str(err.value) for name in VERIFIERS)
    with pytest.raises(ValueError, match="is not one of"):
        EvalDataConfig(path, fields={"question": "query"})
    with pytest.raises(ValueError, match="expected one of"):
        EvalDataConfig(path, reference_format="latex")
    with pytest.raises(ValueError, match="OURS=THEIRS"):
        parse_fields(["query"])
    with pytest.raises(ValueError, match="given twice"):
        parse_fields(["query=a", "query=b"])
    with pytest.raises(FileNotFoundError, match="not found"):
        EvalDataConfig(tmp_path / "missing.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a datasets.save_to_disk folder"):
        EvalDataConfig(tmp_path / "empty")


def test_malformed_rows_are_counted_and_reported(tmp_path, kat_log):
    rows = [
        {"id": "a", "question": "1 + 1?", "answer": "2", "meta": {"gold": "2"}},
        {"id": "b", "question": None, "answer": "3", "meta": {"gold": "3"}},  # null query
        {"id": "c", "question": "2 + 2?", "answer": "4", "meta": {"gold": "  "}},  # empty ref
        {"id": "d", "question": "3 + 3?", "answer": "6", "meta": {"gold": None}},  # null nested
        {"id": "a", "question": "4 + 4?", "answer": "8", "meta": {"gold": "8"}},  # duplicate id
        {"id": "f", "question": "5 + 5?", "answer": "10", "meta": {"gold": "10"}},
    ]
    path = _parquet(tmp_path / "mixed.parquet", rows)
    got = load_eval_data(EvalDataConfig(path, fields={"query": "question",
                                                      "reference": "meta.gold"}))  # fmt: skip
    assert [p.id for p in got] == ["a", "f"] and got[1].reference == "10"
    (warning,) = [r for r in kat_log.records if r.levelno == logging.WARNING]
    msg = warning.getMessage()
    assert "skipped 4 malformed row(s) of 6" in msg
    for i, why in [(1, "query"), (2, "empty 'reference'"), (3, "reference"), (4, "duplicate id")]:
        assert re.search(rf"row {i}: [^;]*{re.escape(why)}", msg), (i, msg)
    # JSONL: bad lines are named FILE:LINE; wrong types count too; nothing valid is an error
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1, "a": "1"}\n\n{not json\n[1, 2]\n{"q": "x?", "a": ["y"]}\n')
    with pytest.raises(ValueError) as err:
        load_eval_data(EvalDataConfig(bad, fields={"query": "q", "reference": "a"},
                                      verifier="math"))  # fmt: skip
    msg = str(err.value)
    assert "no valid rows (4 malformed of 4)" in msg
    for n in (1, 3, 4, 5):
        assert f"{bad}:{n}: " in msg, (n, msg)


def test_prompt_record_jsonl_keeps_its_behaviour(tmp_path):
    """The project's own JSONL: strict (see test_eval_cli), `line-N` ids, "default" category
    (or --category), --verifier as the default verifier; parquet of the same rows is mapped."""
    rows = [{"query": "What is 1 + 1?", "reference": "2"},
            {"id": "q2", "query": "2 + 2?", "reference": "4", "category": "easy"}]  # fmt: skip
    path = _jsonl(tmp_path / "own.jsonl", rows)
    a, b = load_prompts(path)
    assert (a.id, a.category, a.verifier, a.line) == ("line-1", "default", "exact_match", 1)
    assert (b.id, b.category) == ("q2", "easy")
    a, b = load_prompts(EvalDataConfig(path, category="arith", verifier="math"))
    assert (a.category, a.verifier, b.category) == ("arith", "math", "easy")
    a, b = load_prompts(_parquet(tmp_path / "own.parquet", rows))
    assert (a.id, a.category, b.id, b.category) == ("own-0", "own", "q2", "easy")
    _jsonl(path, [*rows, {"query": "3 + 3?", "reference": None}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3: missing 'reference'"):
        load_prompts(path)


def _parser() -> argparse.ArgumentParser:
    from kat_megatron.cli import build_parser

    return build_parser()


def test_kat_eval_cli_maps_a_parquet_set_until_it_needs_a_checkpoint(tmp_path, kat_log, capsys):
    from kat_megatron.cli import main
    from kat_megatron.commands.eval import _rank_args

    data = _parquet(tmp_path / "gsm8k.parquet", GSM8K)
    argv = ["eval", "--ckpt", str(tmp_path / "no_ckpt"), "--data", str(data),
            "--field", "query=question", "--field", "reference=answer",
            "--reference-format", "gsm8k", "--verifier", "math", "--category", "gsm",
            "--split", "test", "--nproc", "2"]  # fmt: skip
    # every rank re-parses the same data options
    args = _parser().parse_args(argv)
    again = _parser().parse_args(_rank_args(args))
    for name in ("field", "split", "verifier", "category", "reference_format", "data"):
        assert getattr(again, name) == getattr(args, name), name
    assert again.field == ["query=question", "reference=answer"]

    argv.remove("--split")
    argv.remove("test")
    assert main(argv) == 2  # the data loaded; the checkpoint is what is missing
    assert "no_ckpt" in capsys.readouterr().err
    assert any("gsm8k.parquet: 2 prompts" in r.getMessage() for r in kat_log.records)
    # a data error stops it first, naming the field and the columns
    bad = [*argv[:5], "--field", "query=problem", *argv[7:]]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "query=problem" in err and "['answer', 'question']" in err
