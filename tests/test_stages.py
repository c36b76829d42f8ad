"""The stage registry: `pytest tests/test_stages.py` (no ranks; nothing is trained)."""

from __future__ import annotations

import pytest

from kat_megatron.config import load_config
from kat_megatron.stages import STAGES, build_trainer, get_stage, load_run_config


def test_one_list_of_stage_names():
    assert list(STAGES) == ["pretrain", "kd", "sft", "rl"]
    assert all(STAGES[name].name == name for name in STAGES)


def test_unknown_stage_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError) as info:
        get_stage("finetune")
    assert str(info.value) == "stage='finetune': expected one of ['pretrain', 'kd', 'sft', 'rl']"
    with pytest.raises(ValueError, match=r"stage='sf'.*did you mean 'sft'\?"):
        get_stage("sf")
    path = tmp_path / "stage.yaml"
    path.write_text("stage: finetune\n")
    load_config(path)  # the config layer knows no stage names
    with pytest.raises(ValueError, match=r"^.*stage.yaml: stage='finetune': expected one of"):
        load_run_config(path)


def test_stage_checks_run_before_anything_is_built():
    # stage rl without prompts, stage kd with an online teacher but no checkpoint: the stage's
    # own checks fail before any process group or model exists.
    cfg = load_config(None, ["stage=rl"])
    with pytest.raises(ValueError, match="stage rl: set rl.prompts"):
        build_trainer(cfg)
    with pytest.raises(ValueError, match="kd.teacher.ckpt"):
        load_run_config(None, ["stage=kd"])
    load_run_config(None, ["stage=sft"])  # no stage check beyond the sections
