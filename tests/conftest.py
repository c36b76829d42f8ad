"""Shared fixtures: a preprocessed tiny corpus and a runner for real `kat` subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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

    Output goes through files, not pipes, so that a stray grandchild holding them open cannot
    stall the test after the command itself has ended.
    """
    cmd = [sys.executable, "-m", "kat_megatron.cli", *args, "--nproc", str(nproc)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    full_env.update(env or {})
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(
            cmd, cwd=REPO, env=full_env, stdout=out, stderr=err, timeout=timeout
        ).returncode
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, code, out.read(), err.read())
    if check and proc.returncode != 0:
        errors = [x for x in proc.stderr.splitlines() if "Error" in x or "error:" in x][:20]
        raise AssertionError(
            f"kat {' '.join(args)} exited {proc.returncode}\n--- error lines ---\n"
            + "\n".join(errors)
            + "\n--- stderr tail ---\n"
            + proc.stderr[-3000:]
        )
    return proc


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
