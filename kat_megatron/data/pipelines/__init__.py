"""AutoThink data pipelines behind `kat data {tag,synthesize,coldstart} CONFIG.yaml`.

`PIPELINES[name]` is (config class, run function); `run(name, config_path, overrides)` loads the
config and runs it. tag -> synthesize -> coldstart: each one's data.jsonl is the next one's input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kat_megatron.data.pipelines.coldstart import ColdstartConfig, run_coldstart
from kat_megatron.data.pipelines.config import PipelineConfig, RoleConfig, load_pipeline_config
from kat_megatron.data.pipelines.synthesize import SynthesizeConfig, run_synthesize
from kat_megatron.data.pipelines.tag import TagConfig, run_tag

PIPELINES: dict[str, tuple[type, Callable[[Any], dict[str, Any]]]] = {
    "tag": (TagConfig, run_tag),
    "synthesize": (SynthesizeConfig, run_synthesize),
    "coldstart": (ColdstartConfig, run_coldstart),
}


def load(name: str, path: str | None, overrides: Sequence[str] = ()) -> Any:
    """The validated config of pipeline `name` from YAML `path` and dotted `overrides`."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {sorted(PIPELINES)}")
    return load_pipeline_config(PIPELINES[name][0], path, overrides)


def run(name: str, path: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load and run pipeline `name`; return its summary."""
    return PIPELINES[name][1](load(name, path, overrides))


__all__ = [
    "PIPELINES",
    "ColdstartConfig",
    "PipelineConfig",
    "RoleConfig",
    "SynthesizeConfig",
    "TagConfig",
    "load",
    "load_pipeline_config",
    "run",
    "run_coldstart",
    "run_synthesize",
    "run_tag",
]
