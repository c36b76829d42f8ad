"""Standard evaluation sets for `kat eval`: JSONL, parquet and saved `datasets` folders mapped
onto eval prompts.

`kat eval --ckpt CKPT --data gsm8k/test.parquet --field query=question --field reference=answer
--reference-format gsm8k --verifier math` runs it (docs/eval_data.md has GSM8K, MATH and code
examples); in Python:

    prompts = load_eval_data(EvalDataConfig("gsm8k.parquet", fields={"query": "question",
                             "reference": "answer"}, reference_format="gsm8k", verifier="math"))

Sources (`EvalDataConfig.path`): a JSONL file (any name but `*.parquet`; `.gz` is decompressed), a
`.parquet` file or a folder of parquet shards, or a `datasets.save_to_disk` folder (a Dataset, or
a DatasetDict whose split is `split`, default `test` if present, else the only one). Shards named
like the Hub's (`test-00000-of-00001.parquet`) or a bare split (`test.parquet`) are splits too.

Rows become `EvalPrompt`s through `fields` (OURS -> THEIRS; THEIRS may be a dotted path into nested
columns, `a.b` or `a.0`); unmapped fields are read under our own names (`OUR_FIELDS`). A missing
`id` is "{stem}-{row index}" (stem: the file's name without suffixes or the folder's name), a
missing `category` is `category` or the stem, a missing `verifier` is `verifier`. The reference is
then extracted (`reference_format`) and shaped for its verifier (`shape_reference`).

A JSONL file read with no `fields` and raw references is the project's own prompt records
(`synthetic_tasks.prompt_record`): read as `runner.load_prompts` always has, where any bad line is
an error naming FILE:LINE, ids default to "line-N" and categories to "default". Everything else is
standard data: malformed rows (no query, empty reference, wrong types, duplicate ids, bad JSON
lines) are skipped and reported in one WARNING with their count and the first few rows; no valid
row left is an error.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from kat_megatron.utils.io import json_line

log = logging.getLogger("kat")

OUR_FIELDS = ("id", "query", "messages", "reference", "verifier", "category", "entry_point",
              "test_setup")  # fmt: skip
"""Fields a row may give (`entry_point`, `test_setup`: code references, see `shape_reference`)."""
REFERENCE_FORMATS = ("raw", "gsm8k", "boxed", "json")
DEFAULT_CATEGORY = "default"
"""Category of prompt records that name none."""
SHOWN = 5
"""Malformed rows named in the warning (or error)."""
_SHARD = re.compile(r"^(?P<split>[A-Za-z]\w*?)-\d+-of-\d+(?:-\w+)?$")
_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the evaluation set (`line`: 1-based line in its JSONL file, else 0)."""

    id: str
    category: str
    messages: list[dict[str, str]]
    reference: Any
    verifier: str
    line: int = 0


def prompt_from_record(obj: Any, line: int, default_verifier: str) -> EvalPrompt:
    """A prompt of a record in our field names (ValueError says what is wrong with it)."""
    from kat_megatron.data.pipelines.io import prompt_messages
    from kat_megatron.verifiers import VERIFIERS, get_verifier

    messages = prompt_messages(obj)
    if obj.get("reference") is None:
        raise ValueError("missing 'reference' (the answer the verifier checks against)")
    verifier = obj.get("verifier", default_verifier)
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; known: {sorted(VERIFIERS)}")
    check = getattr(get_verifier(verifier), "validate_reference", None)
    if check is not None:
        check(obj["reference"])
    rid = obj.get("id", f"line-{line}")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ValueError(f"'id' must be a string or integer, got {rid!r}")
    category = obj.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category:
        raise ValueError(f"'category' must be a non-empty string, got {category!r}")
    return EvalPrompt(str(rid), category, messages, obj["reference"], verifier, line)


def parse_fields(specs: Sequence[str] | None) -> dict[str, str]:
    """`["query=question", "reference=answer"]` -> {"query": "question", ...} (`--field`)."""
    out: dict[str, str] = {}
    for spec in specs or ():
        ours, eq, theirs = spec.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not eq or not ours or not theirs:
            raise ValueError(f"--field {spec!r}: expected OURS=THEIRS, e.g. query=question")
        if ours in out:
            raise ValueError(f"--field {ours}: given twice ({out[ours]!r} and {theirs!r})")
        out[ours] = theirs
    return out


@dataclass
class EvalDataConfig:
    """Where the eval set is and how its rows map onto prompts (`kat eval --data ...`)."""

    path: str | os.PathLike
    """JSONL file, parquet file or folder of shards, or `datasets.save_to_disk` folder."""
    fields: dict[str, str] = field(default_factory=dict)
    """OURS -> THEIRS column (`--field query=question`); OURS is one of `OUR_FIELDS`."""
    split: str | None = None
    """Split of a DatasetDict or split-named parquet shards (None: `test` if present, else the
    only one)."""
    verifier: str = "exact_match"
    """Verifier of rows that name none (a name of the verifier registry)."""
    category: str | None = None
    """Category of rows that give none (None: the dataset's stem; "default" for the project's
    own JSONL)."""
    reference_format: str = "raw"
    """raw (as is), gsm8k (text after the last `####`, thousands commas removed), boxed (content
    of the last `\\boxed{...}`), json (JSON text, as `kat data` pipelines store it in dataset/)."""

    def __post_init__(self) -> None:
        from kat_megatron.verifiers import VERIFIERS

        self.path = Path(self.path)
        if not self.path.exists():
            raise FileNotFoundError(f"--data: {self.path} not found")
        self.fields = dict(self.fields)
        for ours, theirs in self.fields.items():
            if ours not in OUR_FIELDS:
                raise ValueError(
                    f"--field {ours}={theirs}: {ours!r} is not one of {list(OUR_FIELDS)}"
                )
            if not isinstance(theirs, str) or not theirs:
                raise ValueError(f"--field {ours}: expected a column name, got {theirs!r}")
        if "query" in self.fields and "messages" in self.fields:
            raise ValueError("--field: map 'query' or 'messages', not both")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"--verifier {self.verifier!r}: unknown; known: {sorted(VERIFIERS)}")
        if self.category is not None and (not isinstance(self.category, str) or not self.category):
            raise ValueError(f"--category: expected a non-empty name, got {self.category!r}")
        if self.split is not None and (not isinstance(self.split, str) or not self.split):
            raise ValueError(f"--split: expected a non-empty name, got {self.split!r}")
        if self.reference_format not in REFERENCE_FORMATS:
            raise ValueError(f"--reference-format {self.reference_format!r}: expected one of "
                             f"{list(REFERENCE_FORMATS)}")  # fmt: skip
        self.kind  # noqa: B018 (validates the source)

    @cached_property
    def kind(self) -> str:
        """`jsonl`, `parquet` or `saved` (a `datasets.save_to_disk` folder)."""
        if self.path.is_file():
            return "parquet" if self.path.suffix == ".parquet" else "jsonl"
        if (self.path / "dataset_dict.json").is_file() or (self.path / "state.json").is_file():
            return "saved"
        if next(self.path.rglob("*.parquet"), None) is not None:
            return "parquet"
        raise ValueError(f"--data: {self.path} is neither a datasets.save_to_disk folder nor a "
                         "folder of parquet files")  # fmt: skip

    @property
    def native(self) -> bool:
        """The project's own prompt records: a JSONL file, no mapping, raw references."""
        return self.kind == "jsonl" and not self.fields and self.reference_format == "raw"

    @cached_property
    def stem(self) -> str:
        name = self.path.name
        if self.path.is_file():
            for suffix in (".gz", ".jsonl", ".json", ".parquet"):
                name = name.removesuffix(suffix)
        return name or "data"


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces (escaped
    `\\{`/`\\}` do not count), or None."""
    for m in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, m.end()
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            if depth == 0:
                return text[m.end() : i].strip()
            i += 1
    return None


def extract_reference(value: Any, fmt: str) -> Any:
    """The reference of a raw cell in `fmt` (see `EvalDataConfig.reference_format`)."""
    if fmt == "raw" or value is None:
        return value
    if not isinstance(value, str):
        raise ValueError(f"{fmt} reference: expected a string, got {type(value).__name__}")
    if fmt == "json":
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"json reference: invalid JSON ({err.msg})") from None
    if fmt == "gsm8k":
        if "####" not in value:
            raise ValueError("gsm8k reference: no '####' in it")
        return _THOUSANDS.sub("", value.rsplit("####", 1)[1].strip())
    boxed = last_boxed(value)
    if boxed is None:
        raise ValueError("boxed reference: no balanced \\boxed{...} in it")
    return boxed


def shape_reference(reference: Any, verifier: str, entry_point: Any = None,
                    test_setup: Any = None) -> Any:  # fmt: skip
    """The reference as `verifier` takes it.

    code: a dict passes as is (`{"tests": [...]}` or `{"cases": [...]}`); a list of assert
    strings (MBPP's `test_list`) becomes `{"tests": list}`; a string holding a JSON object is
    decoded; any other string (HumanEval's `test`, defining `check(candidate)`) is one test,
    followed by `check(ENTRY_POINT)` when the row has an `entry_point`. `test_setup` (a string or
    list of strings, e.g. MBPP's `test_imports`) is put before every test. Other verifiers: a
    number becomes its text; everything else is kept for the verifier to validate.
    """
    if isinstance(reference, str) and not reference.strip():
        raise ValueError("empty 'reference'")
    if verifier != "code":
        if isinstance(reference, (int, float)) and not isinstance(reference, bool):
            return str(reference)
        return reference
    if isinstance(reference, str) and reference.lstrip().startswith("{"):
        try:
            reference = json.loads(reference)
        except json.JSONDecodeError:
            pass
    if isinstance(reference, dict):
        return reference
    if isinstance(reference, str):
        if entry_point is not None:
            if not isinstance(entry_point, str) or not entry_point.isidentifier():
                raise ValueError(f"'entry_point' must be a function name, got {entry_point!r}")
            reference = f"{reference.rstrip()}\n\ncheck({entry_point})\n"
        reference = [reference]
    if isinstance(reference, (list, tuple)) and all(isinstance(t, str) for t in reference):
        setup = [test_setup] if isinstance(test_setup, str) else test_setup or []
        if not isinstance(setup, list) or not all(isinstance(s, str) for s in setup):
            raise ValueError(
                f"'test_setup' must be a string or list of strings, got {test_setup!r}"
            )
        head = "".join(s.rstrip() + "\n" for s in setup)
        return {"tests": [head + t for t in reference]}
    raise ValueError(f"code reference: expected tests (a list of strings), a test string or an "
                     f"object, got {type(reference).__name__}")  # fmt: skip


def _lookup(row: dict[str, Any], path: str) -> Any:
    """`row[path]`, else a walk along the dotted `path` (dict keys, list indices), or None."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit():
            value = value[int(part)] if -len(value) <= int(part) < len(value) else None
        else:
            return None
    return value


def _mapped(row: Any, index: int, line: int, cfg: EvalDataConfig) -> EvalPrompt:
    """One standard-data row as a prompt; ValueError/TypeError says why it is malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    rec: dict[str, Any] = {}
    for ours in OUR_FIELDS:
        if ours == "messages" and "query" in cfg.fields:
            continue  # an explicit query wins over an unmapped messages column
        value = _lookup(row, cfg.fields.get(ours, ours))
        if value is not None:
            rec[ours] = value
    verifier = rec.setdefault("verifier", cfg.verifier)
    if not isinstance(verifier, str):
        raise ValueError(f"'verifier' must be a name, got {verifier!r}")
    if "reference" in rec:
        ref = extract_reference(rec["reference"], cfg.reference_format)
        rec["reference"] = shape_reference(ref, verifier, rec.get("entry_point"),
                                           rec.get("test_setup"))  # fmt: skip
    rec.setdefault("id", f"{cfg.stem}-{index}")
    rec.setdefault("category", cfg.category or cfg.stem)
    return prompt_from_record(rec, line, cfg.verifier)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(FILE:LINE, LINE, object or the ValueError of a bad line) per non-blank line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                obj = json_line(raw)
            except (ValueError, UnicodeDecodeError) as err:
                obj = ValueError(str(err))
            if obj is not None:
                yield f"{path}:{n}", n, obj


def pick_split(available: Sequence[str], split: str | None, path: Path) -> str:
    """`split` if available; else `test` if present, else the only split."""
    names = sorted(available)
    if split is not None:
        if split not in available:
            raise ValueError(f"--split {split}: {path} has no such split; splits: {names}")
        return split
    if "test" in available:
        return "test"
    if len(names) == 1:
        return names[0]
    raise ValueError(f"{path} has splits {names}: choose one with --split NAME")


def _no_split(cfg: EvalDataConfig) -> None:
    if cfg.split is not None:
        raise ValueError(f"--split {cfg.split}: {cfg.path} holds one dataset, not splits")


def _parquet_files(cfg: EvalDataConfig) -> tuple[list[Path], str | None]:
    """The parquet files of `cfg.path` (of the chosen split) and that split's name."""
    if cfg.path.is_file():
        _no_split(cfg)
        return [cfg.path], None
    files = sorted(cfg.path.glob("*.parquet")) or sorted(cfg.path.rglob("*.parquet"))
    folders = sorted({str(f.parent) for f in files})
    if len(folders) > 1:
        raise ValueError(f"--data: {cfg.path} has parquet files in several folders {folders}: "
                         "pass one of them")  # fmt: skip
    splits = {}
    for f in files:
        m = _SHARD.match(f.stem)
        splits[f] = m.group("split") if m else (f.stem if f.stem in _SPLIT_NAMES else None)
    if None in splits.values():
        _no_split(cfg)
        return files, None
    split = pick_split(set(splits.values()), cfg.split, cfg.path)
    return [f for f in files if splits[f] == split], split


def _table_rows(cfg: EvalDataConfig) -> tuple[list[tuple[str, int, Any]], list[str], str | None]:
    """(where, 0, row) of a parquet or saved source, its columns and the split read."""
    import datasets

    split = None
    if cfg.kind == "saved":
        ds = datasets.load_from_disk(str(cfg.path))
        if isinstance(ds, datasets.DatasetDict):
            split = pick_split(list(ds), cfg.split, cfg.path)
            ds = ds[split]
        else:
            _no_split(cfg)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        files, split = _parquet_files(cfg)
        # pyarrow (what `datasets` reads parquet with) into a Dataset: no cache files written,
        # so ranks that load the same set at once do not race on a cache.
        tables = [pq.read_table(f) for f in files]
        ds = datasets.Dataset(pa.concat_tables(tables, promote_options="permissive"))
    label = f"{cfg.path}[{split}]" if split else str(cfg.path)
    rows = [(f"{label} row {i}", 0, row) for i, row in enumerate(ds)]
    return rows, list(ds.column_names), split


def _check_columns(cfg: EvalDataConfig, columns: Sequence[str]) -> None:
    """Every mapped column exists; a query (or messages) and a reference can be found."""
    have = set(columns)
    shown = sorted(have)
    for ours, theirs in cfg.fields.items():
        if theirs not in have and theirs.split(".")[0] not in have:
            raise ValueError(f"--field {ours}={theirs}: no column {theirs!r} in {cfg.path}; "
                             f"columns: {shown}")  # fmt: skip
    for ours, alt in (("query", "messages"), ("reference", None)):
        if ours in cfg.fields or alt in cfg.fields or ours in have or alt in have:
            continue
        what = f"'{ours}'" + (f" or '{alt}'" if alt else "")
        raise ValueError(f"{cfg.path}: no {what} column (columns: {shown}); map one with "
                         f"--field {ours}=COLUMN")  # fmt: skip


def _native(cfg: EvalDataConfig) -> list[EvalPrompt]:
    """The project's own JSONL: any bad line (blank lines aside) raises ValueError naming
    `file:line` and the reason (up to 10 lines are listed)."""
    prompts, problems, seen = [], [], {}
    for where, n, obj in _jsonl_rows(cfg.path):
        try:
            if isinstance(obj, ValueError):
                raise obj
            if cfg.category is not None and isinstance(obj, dict) and "category" not in obj:
                obj = {**obj, "category": cfg.category}
            p = prompt_from_record(obj, n, cfg.verifier)
            if p.id in seen:
                raise ValueError(f"duplicate id {p.id!r} (first on line {seen[p.id]})")
        except ValueError as err:
            problems.append(f"{where}: {err}")
            continue
        seen[p.id] = n
        prompts.append(p)
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        if not prompts:  # perhaps not prompt records at all
            more += "\n  (a standard set? map its columns: --field query=COL --field reference=COL)"
        raise ValueError(
            f"{len(problems)} bad line(s) in {cfg.path}:\n  " + "\n  ".join(problems[:10]) + more
        )
    if not prompts:
        raise ValueError(f"{cfg.path}: no prompts")
    return prompts


def load_eval_data(cfg: EvalDataConfig) -> list[EvalPrompt]:
    """The prompts of `cfg`'s source (see the module docstring for the rules)."""
    if cfg.native:
        return _native(cfg)
    if cfg.kind == "jsonl":
        rows, split = list(_jsonl_rows(cfg.path)), None
        columns = list(dict.fromkeys(k for *_, r in rows if isinstance(r, dict) for k in r))
    else:
        rows, columns, split = _table_rows(cfg)
    if columns:  # else no row is an object: each is reported below
        _check_columns(cfg, columns)
    prompts, bad, seen = [], [], {}
    for index, (where, line, row) in enumerate(rows):
        try:
            if isinstance(row, ValueError):
                raise row
            p = _mapped(row, index, line, cfg)
            if p.id in seen:
                raise ValueError(f"duplicate id {p.id!r} (first at {seen[p.id]})")
        except (ValueError, TypeError) as err:
            bad.append(f"{where}: {err}")
            continue
        seen[p.id] = where
        prompts.append(p)
    first = "; ".join(bad[:SHOWN]) + (" ..." if len(bad) > SHOWN else "")
    if not prompts:
        raise ValueError(
            f"{cfg.path}: no valid rows ({len(bad)} malformed of {len(rows)}): {first}"
        )
    if bad:
        log.warning("eval data %s: skipped %d malformed row(s) of %d: %s", cfg.path, len(bad),
                    len(rows), first)  # fmt: skip
    log.info("eval data %s%s: %d prompts", cfg.path, f" [{split}]" if split else "", len(prompts))
    return prompts
