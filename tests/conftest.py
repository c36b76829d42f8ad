"""Shared fixtures: the tiny tokenizer, a preprocessed tiny corpus, and runners for real
subprocesses: `kat` (the CLI) and `run_ranks` (a script on local gloo ranks, tests/launcher.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_launcher():
    """tests/launcher.py, loaded by path: tests/ is not a package, and pytest's importlib mode
    puts no test directory on sys.path."""
    spec = importlib.util.spec_from_file_location(
        "kat_tests_launcher", Path(__file__).with_name("launcher.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launcher = _load_launcher()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The packaged tiny tokenizer as a Hugging Face tokenizer (`load_tokenizer("tiny")`), one
    object for the session: a test that changes a tokenizer (adds tokens, sets a template) loads
    its own."""
    from kat_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_tokenizer):
    """The tiny tokenizer as Megatron-Core's datasets see it: `MegatronTokenizerAdapter` named
    "tiny" (what `MegatronTokenizerAdapter.from_name("tiny")` builds)."""
    from kat_megatron.data.tokenizer import MegatronTokenizerAdapter

    return MegatronTokenizerAdapter(tiny_tokenizer, name="tiny")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Megatron indexed dataset prefix of the synthetic corpus, tokenized with the tiny tokenizer."""
    from kat_megatron.data.gpt_data import write_synthetic_corpus
    from kat_megatron.data.preprocess import preprocess_jsonl

    d = tmp_path_factory.mktemp("corpus")
    src = write_synthetic_corpus(d / "corpus.jsonl", n_docs=600, seed=7)
    prefix = d / "corpus"
    preprocess_jsonl([src], prefix, "tiny", workers=1, progress=False)
    return prefix


def run_kat(
    args: list[str],
    nproc: int = 1,
    timeout: int = 300,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `kat ARGS --nproc N` (the real CLI, real gloo ranks) and return the finished process.

    Output goes through files, not pipes; a non-zero exit raises AssertionError with the error
    lines and the stderr tail unless `check=False` (`launcher.run_logged`).
    """
    cmd = [sys.executable, "-m", "kat_megatron.cli", *args, "--nproc", str(nproc)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    full_env.update(env or {})
    label = f"kat {' '.join(args)}"
    return launcher.run_logged(cmd, full_env, timeout, check=check, cwd=REPO, label=label)


def read_metrics(run_dir: Path) -> list[dict]:
    """The metrics.jsonl rows of a run, in step order."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: r["step"])


@pytest.fixture(scope="session")
def kat():
    """`kat(args, nproc=..)`: run the real CLI in a subprocess (see `run_kat`)."""
    return run_kat


@pytest.fixture(scope="session")
def metrics():
    """`metrics(run_dir)`: rows of a run's metrics.jsonl."""
    return read_metrics


@pytest.fixture(scope="session", name="run_ranks")
def _run_ranks():
    """`run_ranks(target, nproc, timeout=.., env=.., check=..)`: run a script on local gloo ranks
    under torchrun (see tests/launcher.py)."""
    return launcher.run_ranks
