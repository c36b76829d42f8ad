"""The `kat` command line: help, model info, and one-line errors for bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kat_megatron.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "examples" / "tiny_pretrain" / "config.yaml")


def test_model_info_prints_counts(capsys):
    assert main(["model", "info", "kat-v1-40b"]) == 0
    out = capsys.readouterr().out
    assert "40.57B" in out


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.lrr=1", "did you mean 'optimizer.lr'"),
        ("parallel.tp=3", "parallel.tp=3 does not divide model.num_attention_heads=2"),
        ("parallel.pp=3", "parallel.pp=3 does not divide model.num_layers=4"),
        ("parallel.ep=2", "parallel.ep=2 needs an MoE model"),
        ("model.fp8=hybrid", "model.fp8=hybrid needs Transformer Engine and CUDA"),
    ],
)
def test_train_config_errors_are_one_line(override, message, capsys):
    assert main(["train", EXAMPLE, override]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("kat: error:") and err.count("\n") == 1


def test_backend_te_without_cuda_is_a_clear_error():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kat_megatron.cli",
            "train",
            EXAMPLE,
            "model.backend=te",
            "parallel.tp=1",
            "run.dir=/tmp/kat_te_err",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2
    assert "model.backend=te but Transformer Engine with CUDA is not available" in proc.stderr


def test_train_help_explains_overrides_and_resume(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--nproc" in out and "--resume" in out and "optimizer.lr=3e-4" in out
