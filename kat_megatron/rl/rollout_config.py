"""`rl.rollout`: which engine generates stage rl's rollouts (docs/rollout_engine.md).

`RolloutConfig(**cfg.rl.rollout)` (built by `rl/parts.py` with the other `rl.*` mappings);
`check_vllm(python)` is the start-up check that `check_rl` runs for `engine: vllm`. Pure: no
torch.distributed, no vLLM import (vLLM lives in its own virtual environment).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ENGINES = ("megatron", "vllm")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout engine of stage rl."""

    engine: str = "megatron"
    """`megatron`: kat's colocated engine on the trainer's live weights (no copy, no extra
    dependency). `vllm`: vLLM worker processes (`replicas`), refitted in memory after every
    optimizer step (`rl/vllm_engine.py`)."""
    vllm_python: str | None = None
    """The Python of vLLM's virtual environment; None: env `KAT_VLLM_PYTHON`, else
    `<repo>/.venv-vllm/bin/python` (`make vllm`)."""
    tp: int = 1
    """vLLM's own tensor-parallel size (independent of `parallel.tp`): each replica's worker
    runs vLLM with this many ranks of its own (on CPU their OpenMP threads are bound to disjoint
    slices of the worker's allowed cores unless `VLLM_CPU_OMP_THREADS_BIND` is set)."""
    replicas: int | None = None
    """vLLM workers over the whole job (`rl/vllm_replicas.py`): None = one per data-parallel
    replica; a divisor of the data-parallel size shares a worker between consecutive replicas
    (its owner gathers their prompts); a multiple gives each replica several workers."""
    refit_bucket_mb: float = 256.0
    """Shared-memory bucket (MiB) the refit packs HF tensors into; a larger tensor travels
    alone in a segment of its own size."""
    startup_timeout_s: float = 600.0
    """Seconds the vLLM worker may take to connect."""
    vllm_args: dict = field(default_factory=dict)
    """Extra keyword arguments of `vllm.LLM` (e.g. `gpu_memory_utilization`, `block_size`)."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"rollout.engine={self.engine!r}: unknown; known: {list(ENGINES)}")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"rollout.tp={self.tp!r}: expected an integer >= 1")
        r = self.replicas
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"rollout.replicas={r!r}: expected an integer >= 1 or null")
        bucket = self.refit_bucket_mb
        if isinstance(bucket, bool) or not isinstance(bucket, (int, float)) or not bucket > 0:
            raise ValueError(f"rollout.refit_bucket_mb={bucket!r}: expected a number > 0")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"rollout.startup_timeout_s={self.startup_timeout_s!r}: expected > 0")
        if not isinstance(self.vllm_args, dict):
            raise ValueError(f"rollout.vllm_args: expected a mapping, got {self.vllm_args!r}")


def resolve_vllm_python(configured: str | None) -> Path:
    """`configured`, else env `KAT_VLLM_PYTHON`, else `<repo>/.venv-vllm/bin/python`."""
    return Path(configured or os.environ.get("KAT_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON)


def check_vllm(python: Path) -> None:
    """ValueError (one line) unless `python` exists and can find the `vllm` package (a spec
    lookup, not an import: a few hundred ms)."""
    hint = "run `make vllm`, or set rl.rollout.vllm_python / KAT_VLLM_PYTHON"
    if not python.is_file():
        raise ValueError(f"rl.rollout.engine=vllm: no vLLM Python at {python}; {hint}")
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        proc = subprocess.run(
            [str(python), "-P", "-c", probe], env=env, capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ValueError(f"rl.rollout.engine=vllm: cannot run {python} ({err}); {hint}") from None
    if proc.returncode != 0:
        raise ValueError(f"rl.rollout.engine=vllm: {python} cannot import vllm; {hint}")
