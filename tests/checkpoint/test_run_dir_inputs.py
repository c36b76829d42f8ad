"""Commands that take a checkpoint accept the run directory a training wrote, and its export is
complete: `pytest tests/checkpoint/test_run_dir_inputs.py` (real `kat` subprocesses, gloo ranks).

One tiny model is written at TP=2 with a vocabulary padding that differs between TP=1 (512 -> 576)
and TP=2 (512 -> 768), so a command that ignored the layout the checkpoint records would fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny_pretrain" / "config.yaml"


def _kat(*args: str) -> subprocess.CompletedProcess:
    """`kat ARGS` for commands without --nproc (`run_kat` adds one)."""
    cmd = [sys.executable, "-m", "kat_megatron.cli", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, kat) -> Path:
    """A run directory with the initial weights saved at TP=2 (training.steps=0)."""
    run = tmp_path_factory.mktemp("tp2") / "run"
    kat(["train", str(EXAMPLE), "training.steps=0", "parallel.tp=2", f"run.dir={run}",
         "model.make_vocab_size_divisible_by=192"], nproc=2)  # fmt: skip
    assert (run / "checkpoints" / "iter_0000000" / "kat_meta.json").is_file()
    return run


def test_export_and_verify_at_the_recorded_layout(run_dir, tmp_path):
    hf = tmp_path / "hf"
    proc = _kat("convert", "mcore-to-hf", "--mcore", str(run_dir), "--out", str(hf))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 512
    # No --tokenizer: the one the run trained with (data.tokenizer=tiny), with the AutoThink
    # chat template, loadable as transformers users load any model folder.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<judge>\n"), prompt
    assert tok.convert_tokens_to_ids("<judge>") != tok.unk_token_id
    assert AutoModelForCausalLM.from_pretrained(str(hf)).config.architectures == [
        "Qwen2ForCausalLM"
    ]
    # No --tp/--nproc: the layout the checkpoint was written at (TP=2, two ranks).
    proc = _kat("convert", "verify", "--hf", str(hf), "--mcore", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["layout"] == "tp2pp1" and row["ok"], row
    assert row["max_abs_logit_diff"] <= 1e-3
    # Another TP needs a reshard first (its vocabulary padding differs): a one-line error.
    proc = _kat("convert", "verify", "--hf", str(hf), "--mcore", str(run_dir), "--tp", "1")
    assert proc.returncode == 2
    assert "padded to 768 rows, but TP=1 pads to 576" in proc.stderr
    assert "kat convert reshard --tp 1" in proc.stderr


def test_serve_takes_the_run_directory(run_dir, tmp_path):
    ready = tmp_path / "ready.txt"
    cmd = [sys.executable, "-m", "kat_megatron.cli", "serve", "--ckpt", str(run_dir),
           "--nproc", "2", "--port", "0", "--ready-file", str(ready)]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "kat serve did not become ready"
            time.sleep(0.5)
        models = httpx.get(ready.read_text().strip() + "/models", timeout=30).json()  # URL ends /v1
        assert [m["id"] for m in models["data"]] == ["run"]  # the run directory's name
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
