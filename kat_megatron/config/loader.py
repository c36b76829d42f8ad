"""`kat train CONFIG.yaml key=value ...`: load, override, print and save run configs.

`load_config(path, overrides)` reads a YAML mapping whose top-level keys are `stage` and the
section names of `KatConfig` (any may be missing), applies dotted `section.key=value` overrides
(values parsed as YAML, so `3e-4`, `true`, `null` and `[a, b]` work), fills the model section from
its `preset` (fields given in the file or overrides win) and returns a validated `KatConfig`.
Every user error is a one-line ValueError naming the file or override and the dotted key.
`dump_config` writes the resolved config so that `load_config` reads it back unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from kat_megatron.config.schema import KatConfig
from kat_megatron.utils.io import atomic_write_text

_NONE = type(None)


def _sections() -> dict[str, type]:
    """Section name -> dataclass type, from KatConfig's annotations."""
    hints = typing.get_type_hints(KatConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(KatConfig) if f.name != "stage"}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(dotted: str) -> str:
    """'unknown key ...' with the nearest valid key, if any, as a suggestion."""
    sections = _sections()
    section, dot, name = dotted.partition(".")
    if not dot:
        match = difflib.get_close_matches(section, ["stage", *sections], n=1)
        suggestion = match[0] if match else None
    elif section not in sections:
        match = difflib.get_close_matches(section, list(sections), n=1)
        suggestion = f"{match[0]}.{name}" if match else None
    else:
        match = difflib.get_close_matches(name, list(_field_types(sections[section])), n=1)
        suggestion = f"{section}.{match[0]}" if match else None
        if suggestion is None:  # a valid key placed in the wrong section
            owners = [s for s, cls in sections.items() if name in _field_types(cls)]
            suggestion = f"{owners[0]}.{name}" if owners else None
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    return f"unknown key '{dotted}'{hint}"


def _options(hint: Any) -> tuple:
    """The member types of a union annotation, or `(hint,)`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _type_name(hint: Any) -> str:
    return " or ".join(
        "null" if a is _NONE else getattr(a, "__name__", str(a)) for a in _options(hint)
    )


def _coerce(dotted: str, hint: Any, value: Any) -> Any:
    """Return `value` checked against annotation `hint` (ints widen to float; float strings such
    as YAML's `3e-4` parse), or raise ValueError naming the key, expected type and value."""
    options = _options(hint)
    if value is None and _NONE in options:
        return None
    for opt in options:
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if opt is str and isinstance(value, str):
            return value
        if opt is list and isinstance(value, list):
            return list(value)
        if opt is dict and isinstance(value, dict):
            return dict(value)  # a nested mapping, validated by its section (e.g. rl.rewards)
    shown = "null" if value is None else f"{type(value).__name__} {value!r}"
    raise ValueError(f"{dotted}: expected {_type_name(hint)}, got {shown}")


def _check_section(prefix: str, section: str, values: Any) -> dict[str, Any]:
    """Validate keys and value types of one raw section mapping; return a coerced copy."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(
            f"{prefix}{section}: expected a mapping of keys, got {type(values).__name__} {values!r}"
        )
    types_ = _field_types(_sections()[section])
    out = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in types_:
            raise ValueError(f"{prefix}{_unknown_key(dotted)}")
        try:
            out[key] = _coerce(dotted, types_[key], value)
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None
    return out


def _check_raw(prefix: str, raw: Any) -> dict[str, Any]:
    """Validate a whole raw config mapping (as read from YAML)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix}expected a mapping of sections, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    sections = _sections()
    for key, value in raw.items():
        if key == "stage":
            try:
                out[key] = _coerce("stage", str, value)
            except ValueError as err:
                raise ValueError(f"{prefix}{err}") from None
        elif key in sections:
            out[key] = _check_section(prefix, key, value)
        else:
            raise ValueError(f"{prefix}{_unknown_key(str(key))}")
    return out


def _apply_override(raw: dict[str, Any], text: str) -> None:
    """Apply one `section.key=value` (or `stage=value`) override to `raw` in place."""
    prefix = f"override {text!r}: "
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{prefix}expected the form section.key=value (e.g. optimizer.lr=3e-4)")
    sections = _sections()
    section, _, name = key.partition(".")
    if key in sections:
        raise ValueError(f"{prefix}'{key}' is a section; expected the form {key}.KEY=value")
    nested = None
    if key == "stage":
        hint: Any = str
    elif section in sections:
        hint = _field_types(sections[section]).get(name)
        head, dot, rest = name.partition(".")
        if hint is None and dot and _field_types(sections[section]).get(head) is dict:
            nested, hint = (head, rest), Any  # rl.rewards.weights=...: checked by the section
    else:
        hint = None
    if hint is None:
        raise ValueError(f"{prefix}{_unknown_key(key)}")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as err:
        if str not in _options(hint):
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{prefix}cannot parse {value_text!r} as YAML: {problem}") from None
        value = value_text
    if nested is not None:
        raw.setdefault(section, {}).setdefault(nested[0], {})[nested[1]] = value
        return
    if str in _options(hint) and value is not None and not isinstance(value, str):
        value = value_text.strip()  # text fields take the text as written: run.name=2024
    try:
        value = _coerce(key, hint, value)
    except ValueError as err:
        raise ValueError(f"{prefix}{err}") from None
    if key == "stage":
        raw["stage"] = value
    else:
        raw.setdefault(section, {})[name] = value


def _model_fields(model: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Merge the model section onto its preset (explicit fields win)."""
    default = next(
        f.default for f in dataclasses.fields(_sections()["model"]) if f.name == "preset"
    )
    name = model.get("preset", default)
    if name is None:
        return model
    from kat_megatron.config.presets import get_preset

    try:
        preset = get_preset(name)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{prefix}model.preset={name!r}: {err}") from None
    base = _check_section(f"{prefix}preset {name!r}: ", "model", preset)
    return {**base, **model, "preset": name}


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> KatConfig:
    """Read `path` (None: all defaults), apply `overrides`, resolve the preset, validate."""
    prefix = ""
    raw: Any = {}
    if path is not None:
        prefix = f"{os.fspath(path)}: "
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f"line {mark.line + 1}: " if mark is not None else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ValueError(f"{prefix}invalid YAML at {where}{problem}") from None
    raw = _check_raw(prefix, raw)
    for text in overrides:
        _apply_override(raw, text)
    raw["model"] = _model_fields(raw.get("model", {}), prefix)
    try:
        built = {name: cls(**raw.get(name, {})) for name, cls in _sections().items()}
        stage = {"stage": raw["stage"]} if "stage" in raw else {}
        return KatConfig(**stage, **built)
    except ValueError as err:
        raise ValueError(f"{prefix}{err}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: KatConfig) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML-safe), in field order."""
    return _plain(dataclasses.asdict(cfg))


def format_config(cfg: KatConfig) -> str:
    """The resolved config as YAML text (what `kat train` prints at start)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def dump_config(cfg: KatConfig, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML to `path` atomically (temp file in the same directory, then rename)."""
    atomic_write_text(path, format_config(cfg))
