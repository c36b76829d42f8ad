"""Where kat checkpoints lie and what marks one complete: the one module that reads and writes
`kat_meta.json` (no torch: `kat submit`, `kat jobs` and the converters use it too).

    python -c "from kat_megatron.training.checkpoint_meta import resolve_checkpoint as r; print(r('runs/tiny_pretrain'))"

A checkpoint root (`checkpoint.dir`, by default `<run.dir>/checkpoints`) holds `iter_NNNNNNN/`
directories; one is complete once `kat_meta.json` (step, run config, extras) is in it, which
`training/checkpointing.py` writes last, before renaming `iter_N.tmp/` to `iter_N/`.
`resolve_checkpoint` is the resolver every command that takes a checkpoint goes through: it
accepts one `iter_N/`, a checkpoint root (its newest complete one) or a run directory (the
newest under its `checkpoints/`, or under the `checkpoint.dir` its `config.yaml` records).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kat_megatron.utils.io import atomic_write_text

META_FILE = "kat_meta.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """The directory of step `step`'s checkpoint under `root`."""
    return Path(root) / f"iter_{step:07d}"


def is_complete(path: str | Path) -> bool:
    """True when `path` is one complete checkpoint (its `kat_meta.json` exists)."""
    return (Path(path) / META_FILE).is_file()


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _ITER_RE.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (None when there is none)."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _recorded_root(run_dir: Path) -> Path | None:
    """`checkpoint.dir` of the run config a training wrote into `run_dir` (None: not set)."""
    import yaml

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        raw = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
        root = (raw.get("checkpoint") or {}).get("dir")
    except (yaml.YAMLError, AttributeError):
        return None
    return Path(root) if root else None


def resolve_checkpoint(path: str | Path) -> Path:
    """One complete checkpoint: `path` itself, the newest under it (a checkpoint root), or the
    newest of the run directory `path` (under `checkpoints/`, or its recorded `checkpoint.dir`).
    FileNotFoundError says what was looked for."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path, path / "checkpoints", _recorded_root(path)):
        if root is not None and (found := latest_checkpoint(root)) is not None:
            return found
    what = "does not exist" if not path.exists() else "holds no complete kat checkpoint"
    raise FileNotFoundError(
        f"{path}: {what} (expected an iter_N directory with {META_FILE}, a checkpoints folder "
        "of them, or a run directory whose checkpoints/ has one)"
    )


def read_meta(path: str | Path, need_model: bool = True) -> dict[str, Any]:
    """`kat_meta.json` of the checkpoint `path` resolves to; with `need_model` it must hold
    the run config's `config.model` (what a reader needs to build the model)."""
    ckpt = resolve_checkpoint(path)
    meta = json.loads((ckpt / META_FILE).read_text())
    if need_model and ("model" not in (meta.get("config") or {})):
        raise ValueError(f"{ckpt}: {META_FILE} has no config.model section")
    return meta


def write_meta(ckpt_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write `kat_meta.json` into `ckpt_dir` atomically: the last file of a save."""
    atomic_write_text(Path(ckpt_dir) / META_FILE, json.dumps(meta, indent=2))


def write_latest(root: str | Path, step: int) -> None:
    """`latest_checkpointed_iteration.txt` under `root` (informational)."""
    atomic_write_text(Path(root) / LATEST_FILE, f"{step}\n")
