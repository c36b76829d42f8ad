"""Configs of `kat data {tag,synthesize,coldstart} CONFIG.yaml [key=value ...]`.

`PipelineConfig` holds what every pipeline shares (input, output, client, resume, ...);
`RoleConfig` is one model role (a teacher, the critic, the judge writer). `load_pipeline_config`
reads a YAML mapping into a pipeline's config class, applies dotted overrides
(`think_on.model=deepseek-r1`, values parsed as YAML) and validates; unknown keys fail with the
nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from kat_megatron.data.llm_client import LLMClientConfig


@dataclass
class RoleConfig:
    """One model role: which model, where, with which sampling parameters and prompts."""

    model: str = "default"
    """Model name sent in requests."""
    base_url: str | None = None
    """Endpoint of this role; None uses `client.base_url`."""
    system_prompt: str | None = None
    """System message prepended to the role's requests (None: none)."""
    prompt: str | None = None
    """User-message template (Python format fields as in the pipeline's default); None: default."""
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 4096
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Extra request fields sent as they are, e.g. `{"chat_template_kwargs": {"think_mode":
    "think_on"}}` for `kat serve` (as vLLM's `chat_template_kwargs`)."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: expected a model name")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature}: expected 0..2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: expected (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: expected >= 1")

    def params(self, seed: int) -> dict[str, Any]:
        """Sampling parameters of one request."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": seed,
            **self.extra_body,
        }


@dataclass
class PipelineConfig:
    """Fields shared by all data pipelines."""

    input: str = ""
    """Input JSONL (one record per line; see docs/autothink_data.md)."""
    output: str = ""
    """Output directory: dataset/ (HF datasets), data.jsonl, rejected.jsonl, summary.json."""
    client: LLMClientConfig = field(default_factory=LLMClientConfig)
    """Endpoint defaults; `client.cache_dir` None means OUTPUT/.work/llm_cache."""
    seed: int = 0
    """Base of per-request seeds (sample i of a role uses seed + i)."""
    limit: int | None = None
    """Process only the first N valid records."""
    resume: bool = True
    """Continue from OUTPUT/.work (finished records are kept, cached requests not re-sent);
    false discards finished records (the request cache is kept)."""
    default_verifier: str = "math"
    """Verifier for records without a `verifier` field."""
    tokenizer: str | None = None
    """Tokenizer for length percentiles (`tiny` or a HF directory); None counts characters."""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("input: expected the input JSONL path")
        if not self.output:
            raise ValueError("output: expected an output directory")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: expected >= 1 or null")
        from kat_megatron.verifiers import VERIFIERS

        if self.default_verifier not in VERIFIERS:
            raise ValueError(
                f"default_verifier={self.default_verifier!r}: unknown; known: {sorted(VERIFIERS)}"
            )

    @property
    def cache_dir(self) -> str:
        return self.client.cache_dir or os.path.join(self.output, ".work", "llm_cache")


_NONE = type(None)


def _options(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _dataclass_in(hint: Any) -> type | None:
    return next((o for o in _options(hint) if dataclasses.is_dataclass(o)), None)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    for opt in _options(hint):
        base = typing.get_origin(opt) or opt
        if opt is _NONE and value is None:
            return None
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base in (str, list, dict) and isinstance(value, base):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in _options(hint))
    raise ValueError(f"{key}: expected {names.replace('NoneType', 'null')}, got {value!r}")


def _unknown(cls: type, key: str, dotted: str) -> ValueError:
    names = [f.name for f in dataclasses.fields(cls)]
    match = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{dotted[: -len(key)]}{match[0]}'?" if match else ""
    return ValueError(f"unknown key '{dotted}'{hint}")


def _build(cls: type, raw: Any, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown(cls, str(key), prefix + str(key))
        sub = _dataclass_in(hints[key])
        if sub is not None and value is not None:
            kwargs[key] = _build(sub, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, hints[key], value)
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"{prefix}{err}" if prefix else str(err)) from None


def _set_override(cls: type, raw: dict[str, Any], text: str) -> None:
    key, sep, value_text = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r}: expected key=value (e.g. think_on.model=NAME)")
    parts = key.strip().split(".")
    node, owner = raw, cls
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(owner)}
        if part not in names:
            raise _unknown(owner, part, ".".join(parts[: i + 1]))
        hint = typing.get_type_hints(owner)[part]
        if i == len(parts) - 1:
            value = yaml.safe_load(value_text) if value_text.strip() else ""
            if str in _options(hint) and value is not None and not isinstance(value, str):
                value = value_text.strip()  # text fields take the text as written
            node[part] = value
            return
        owner = _dataclass_in(hint)
        if owner is None:
            raise ValueError(f"override {text!r}: '{'.'.join(parts[: i + 1])}' has no sub-keys")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def load_pipeline_config(cls: type, path: str | None, overrides: Sequence[str] = ()) -> Any:
    """Read YAML `path` (None: defaults only), apply dotted `overrides`, build `cls`."""
    prefix = f"{path}: " if path else ""
    raw: Any = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{prefix}invalid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix}expected a mapping of keys")
    try:
        for text in overrides:
            _set_override(cls, raw, text)
        return _build(cls, raw)
    except ValueError as err:
        raise ValueError(f"{prefix}{err}") from None
