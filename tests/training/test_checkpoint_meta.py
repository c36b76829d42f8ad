"""The checkpoint resolver and kat_meta.json: `pytest tests/training/test_checkpoint_meta.py`.

Directories are laid out by hand (no torch): what `save_checkpoint` leaves behind, including a
save that crashed (`iter_N.tmp/`, or `iter_N/` without its meta file).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kat_megatron.training.checkpoint_meta import (
    META_FILE,
    checkpoint_dir,
    complete_checkpoints,
    read_meta,
    resolve_checkpoint,
    write_meta,
)


def _ckpt(root: Path, step: int, complete: bool = True) -> Path:
    d = checkpoint_dir(root, step)
    d.mkdir(parents=True)
    if complete:
        write_meta(d, {"step": step, "config": {"model": {"num_layers": 2}}})
    return d


def test_resolver_takes_an_iter_dir_a_checkpoints_folder_or_a_run_dir(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    _ckpt(ckpts, 5)
    newest = _ckpt(ckpts, 10)
    _ckpt(ckpts, 20, complete=False)  # a crashed save: no kat_meta.json
    (ckpts / "iter_0000030.tmp").mkdir()  # a save in progress
    assert resolve_checkpoint(ckpts / "iter_0000005") == ckpts / "iter_0000005"
    assert resolve_checkpoint(ckpts) == newest
    assert resolve_checkpoint(run) == newest
    assert [s for s, _ in complete_checkpoints(ckpts)] == [5, 10]


def test_run_dir_with_its_own_checkpoint_dir(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "store"
    run.mkdir()
    (run / "config.yaml").write_text(f"checkpoint:\n  dir: {elsewhere}\n")
    newest = _ckpt(elsewhere, 3)
    assert resolve_checkpoint(run) == newest


def test_errors_say_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    _ckpt(tmp_path / "checkpoints", 1, complete=False)
    with pytest.raises(FileNotFoundError, match=r"holds no complete kat checkpoint.*iter_N"):
        resolve_checkpoint(tmp_path)


def test_meta_round_trip_and_model_section(tmp_path):
    d = _ckpt(tmp_path, 7)
    assert read_meta(tmp_path)["step"] == 7
    assert json.loads((d / META_FILE).read_text())["config"]["model"] == {"num_layers": 2}
    write_meta(d, {"step": 7})  # a checkpoint without the run config
    assert read_meta(d, need_model=False) == {"step": 7}
    with pytest.raises(ValueError, match="no config.model section"):
        read_meta(d)
