"""kat_megatron.config.loader: YAML + overrides + presets -> KatConfig, and back to YAML."""

from __future__ import annotations

import os

import pytest
import yaml

from kat_megatron.config import (
    KatConfig,
    ModelConfig,
    config_to_dict,
    dump_config,
    format_config,
    load_config,
    presets,
)


def _write(tmp_path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def fake_preset(monkeypatch):
    """Replace the preset table with one preset, 'p', so tests do not depend on real sizes."""
    table = {"p": dict(num_layers=8, hidden_size=128, num_attention_heads=8, num_query_groups=4)}

    def get_preset(name):
        if name not in table:
            raise ValueError(f"unknown model preset {name!r}")
        return dict(table[name], preset=name)

    monkeypatch.setattr(presets, "get_preset", get_preset)


# --- loading and round trip -------------------------------------------------------------------


def test_defaults_without_file():
    cfg = load_config(None)
    assert isinstance(cfg, KatConfig)
    assert cfg.stage == "pretrain"
    assert cfg.model.preset == "tiny-dense"


def test_empty_file_and_missing_sections(tmp_path):
    assert load_config(_write(tmp_path, "")) == load_config(None)
    cfg = load_config(_write(tmp_path, "stage: sft\ntraining:\n  steps: 7\nlogging:\n"))
    assert (cfg.stage, cfg.training.steps, cfg.optimizer.lr) == ("sft", 7, 3e-4)


def test_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "stage=kd",
            "kd.teacher={mode: online, ckpt: /ckpt/teacher}",
            "model.preset=tiny-moe",
            "model.mtp_num_layers=1",
            "parallel.tp=2",
            "parallel.ep=2",
            "optimizer.lr=1e-3",
            "optimizer.min_lr=0",
            "data.paths=[0.3, /data/a, 0.7, /data/b]",
            "data.mock=true",
            "run.name=2024",
        ],
    )
    path = tmp_path / "out" / "config.yaml"
    dump_config(cfg, path)
    again = load_config(str(path))
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again.run.name == "2024" and again.optimizer.min_lr == 0.0


def test_round_trip_without_preset(tmp_path):
    cfg = load_config(None, ["model.preset=null", "model.num_layers=6"])
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg


def test_dump_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    dump_config(load_config(None), path)
    assert os.listdir(tmp_path) == ["config.yaml"]  # no temp file left behind
    assert yaml.safe_load(path.read_text())["stage"] == "pretrain"


def test_format_config_is_the_dict_as_yaml():
    cfg = load_config(None, ["training.steps=3"])
    text = format_config(cfg)
    assert text.startswith("stage: pretrain\nmodel:\n")
    assert yaml.safe_load(text) == config_to_dict(cfg)
    assert list(config_to_dict(cfg)) == ["stage", *(s for s in config_to_dict(cfg) if s != "stage")]


def test_float_spellings_in_file(tmp_path):
    cfg = load_config(_write(tmp_path, "optimizer:\n  lr: 3e-4\n  min_lr: 0\n  clip_grad: 2\n"))
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.min_lr == 0.0 and isinstance(cfg.optimizer.min_lr, float)
    assert cfg.optimizer.clip_grad == 2.0


# --- overrides ----------------------------------------------------------------------------------


def test_overrides_of_each_type(tmp_path):
    path = _write(tmp_path, "training:\n  steps: 5\nparallel:\n  vpp: 2\n  pp: 2\n")
    cfg = load_config(
        path,
        [
            "training.steps=11",  # int, beats the file
            "optimizer.lr=3e-4",  # float written as YAML 1.1 reads a string
            "optimizer.weight_decay=0",  # int accepted for a float field
            "logging.wandb=true",  # bool
            "parallel.vpp=null",  # null
            "parallel.pp=1",
            "data.jsonl=[a.jsonl, b.jsonl]",  # list
            "data.tokenizer=/models/qwen",  # str
            "run.name=42",  # a number for a text field stays the text
            "stage=sft",  # top-level key
        ],
    )
    assert cfg.training.steps == 11
    assert cfg.optimizer.lr == 3e-4
    assert cfg.optimizer.weight_decay == 0.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.logging.wandb is True
    assert cfg.parallel.vpp is None and cfg.parallel.pp == 1
    assert cfg.data.jsonl == ["a.jsonl", "b.jsonl"]
    assert cfg.data.tokenizer == "/models/qwen"
    assert cfg.run.name == "42"
    assert cfg.stage == "sft"


def test_later_override_wins():
    assert load_config(None, ["training.steps=3", "training.steps=4"]).training.steps == 4


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr", "override 'optimizer.lr': expected the form section.key=value"),
        ("=3", "override '=3': expected the form section.key=value"),
        ("model=3", "override 'model=3': 'model' is a section; expected the form model.KEY=value"),
    ],
)
def test_override_form_errors(override, expected):
    with pytest.raises(ValueError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(expected)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lrr=1", "unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?"),
        ("optimiser.lr=1", "unknown key 'optimiser.lr'; did you mean 'optimizer.lr'?"),
        ("model.lr=1", "unknown key 'model.lr'; did you mean 'optimizer.lr'?"),
        ("stag=kd", "unknown key 'stag'; did you mean 'stage'?"),
        (
            "model.num_layers.x=1",
            "unknown key 'model.num_layers.x'; did you mean 'model.num_layers'?",
        ),
    ],
)
def test_override_unknown_key(override, expected):
    with pytest.raises(ValueError) as info:
        load_config(None, [override])
    assert str(info.value) == f"override {override!r}: {expected}"


def test_override_type_errors():
    with pytest.raises(ValueError) as info:
        load_config(None, ["training.steps=ten"])
    assert (
        str(info.value)
        == "override 'training.steps=ten': training.steps: expected int, got str 'ten'"
    )
    with pytest.raises(ValueError, match=r"logging.wandb: expected bool, got str 'maybe'"):
        load_config(None, ["logging.wandb=maybe"])
    with pytest.raises(ValueError, match=r"run.name: expected str, got null$"):
        load_config(None, ["run.name=null"])
    with pytest.raises(
        ValueError, match=r"^override 'data.paths=\[a,': cannot parse '\[a,' as YAML"
    ):
        load_config(None, ["data.paths=[a,"])


# --- errors in files ----------------------------------------------------------------------------


def test_unknown_key_in_file_suggests_nearest(tmp_path):
    path = _write(tmp_path, "optimizer:\n  lrr: 0.1\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?"


def test_unknown_section_in_file(tmp_path):
    path = _write(tmp_path, "trainig:\n  steps: 3\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: unknown key 'trainig'; did you mean 'training'?"


def test_type_errors_in_file_name_key_type_and_value(tmp_path):
    cases = {
        "training:\n  steps: ten\n": "training.steps: expected int, got str 'ten'",
        "training:\n  steps: true\n": "training.steps: expected int, got bool True",
        "training:\n  steps: 2.5\n": "training.steps: expected int, got float 2.5",
        "model:\n  num_layers: {a: 1}\n": "model.num_layers: expected int, got dict {'a': 1}",
        "parallel:\n  vpp: [1]\n": "parallel.vpp: expected int or null, got list [1]",
        "optimizer:\n  lr: fast\n": "optimizer.lr: expected float, got str 'fast'",
        "data:\n  paths: a\n": "data.paths: expected list, got str 'a'",
        "model: 3\n": "model: expected a mapping of keys, got int 3",
        "stage: [kd]\n": "stage: expected str, got list ['kd']",
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = _write(tmp_path, text, f"c{i}.yaml")
        with pytest.raises(ValueError) as info:
            load_config(path)
        assert str(info.value) == f"{path}: {expected}"


def test_top_level_must_be_a_mapping(tmp_path):
    path = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ValueError, match=r"expected a mapping of sections, got list"):
        load_config(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "training:\n  steps: 3\n  seed: [1, 2\nrun:\n  name: x\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: invalid YAML at line ")
    assert int(msg.split("line ")[1].split(":")[0]) in (3, 4)


def test_validation_errors_are_prefixed_with_the_file(tmp_path):
    path = _write(tmp_path, "model:\n  fp8: hybrid\n  backend: local\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert (
        str(info.value)
        == f"{path}: model.fp8 needs Transformer Engine: set model.backend=te (or auto)"
    )
    path = _write(tmp_path, "parallel:\n  tp: 3\n", "tp.yaml")
    with pytest.raises(
        ValueError, match=r"tp.yaml: parallel.tp=3 does not divide model.num_attention"
    ):
        load_config(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load_config("/nonexistent/config.yaml")


# --- presets ------------------------------------------------------------------------------------


def test_preset_fills_model_and_explicit_fields_win(tmp_path, fake_preset):
    path = _write(tmp_path, "model:\n  preset: p\n  num_layers: 2\n")
    cfg = load_config(path, ["model.num_query_groups=8"])
    assert cfg.model.preset == "p"
    assert cfg.model.hidden_size == 128 and cfg.model.num_attention_heads == 8  # from the preset
    assert cfg.model.num_layers == 2  # file beats preset
    assert cfg.model.num_query_groups == 8  # override beats preset
    assert cfg.model.vocab_size == ModelConfig.vocab_size  # neither: dataclass default


def test_preset_chosen_by_override(fake_preset):
    cfg = load_config(None, ["model.preset=p"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (8, 128)


def test_null_preset_uses_fields_as_given(tmp_path, fake_preset):
    path = _write(tmp_path, "model:\n  preset: null\n  num_layers: 2\n")
    cfg = load_config(path)
    assert cfg.model.preset is None
    assert cfg.model.num_layers == 2
    assert cfg.model.hidden_size == ModelConfig.hidden_size


def test_unknown_preset(tmp_path, fake_preset):
    path = _write(tmp_path, "model:\n  preset: huge\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: model.preset='huge': unknown model preset 'huge'"


def test_real_presets_resolve():
    for name in ("tiny-dense", "tiny-moe"):
        cfg = load_config(None, [f"model.preset={name}"])
        for key, value in presets.get_preset(name).items():
            assert getattr(cfg.model, key) == value, (name, key)
