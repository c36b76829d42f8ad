"""What a SLURM job asks for: `kat submit CONFIG.yaml --nodes N --gpus-per-node G --time HH:MM:SS`.

`JobSpec` holds the allocation and launch options of one submission and validates them on its
own (node counts, time format, container vs venv); `check_fits` validates them against a config
(world size vs TP x PP x CP x EP, batch size vs data parallelism) with the same one-line errors
as `kat train`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kat_megatron.config import KatConfig
from kat_megatron.config.schema import check_layout

_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):(\d{2}):(\d{2})$")
DEFAULT_WARN_SECONDS = 300


def parse_time(text: str) -> int:
    """Seconds in a SLURM time limit `HH:MM:SS` or `D-HH:MM:SS`; ValueError otherwise."""
    m = _TIME.match(text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: expected HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00)")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    if minutes > 59 or seconds > 59:
        raise ValueError(f"--time {text!r}: minutes and seconds must be below 60")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"--time {text!r}: the time limit must be positive")
    return total


@dataclass
class JobSpec:
    """One `kat submit`: the allocation, the software environment and the preemption policy."""

    nodes: int
    """Nodes to allocate; one srun task (one torchrun agent) runs on each."""
    gpus_per_node: int
    """GPUs per node; 0 means CPU nodes (gloo), with `ranks_per_node` ranks each."""
    time: str
    """Time limit, `HH:MM:SS` or `D-HH:MM:SS`."""
    partition: str | None = None
    """SLURM partition; None means the cluster's default partition."""
    account: str | None = None
    ranks_per_node: int | None = None
    """Training ranks per node; None means `gpus_per_node` (or 1 on CPU nodes)."""
    cpus_per_node: int | None = None
    """CPUs for the node's task (`--cpus-per-task`); None leaves it to the cluster."""
    container: str | None = None
    """Container image for pyxis/enroot (`srun --container-image`); excludes `venv`."""
    mounts: list[str] = field(default_factory=list)
    """Container mounts `SRC:DST[:FLAGS]` (pyxis `--container-mounts`)."""
    venv: str | None = None
    """Virtual environment activated before `srun`; excludes `container`."""
    chain: int = 0
    """Follow-on jobs, each starting after the previous one ends (`--dependency=afterany`)."""
    warn_seconds: int | None = None
    """SIGUSR1 this many seconds before the time limit; None means min(300, limit / 4)."""
    max_requeues: int = 20
    """The job stops requeueing itself after this many restarts."""
    job_name: str | None = None
    """SLURM job name; None means `kat-<run.name>`."""
    env: list[str] = field(default_factory=list)
    """Extra `KEY=VALUE` exports, applied after the defaults (so they override them)."""

    def __post_init__(self) -> None:
        for name, low in (("nodes", 1), ("gpus_per_node", 0), ("chain", 0), ("max_requeues", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {value!r}: expected an integer >= {low}")
        for name in ("ranks_per_node", "cpus_per_node", "warn_seconds"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= 1")
        if self.gpus_per_node and self.ranks_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"--ranks-per-node {self.ranks_per_node} differs from --gpus-per-node "
                f"{self.gpus_per_node}: GPU jobs run one rank per GPU"
            )
        limit = parse_time(self.time)
        if self.warn_seconds is not None and self.warn_seconds >= limit:
            raise ValueError(
                f"--warn-seconds {self.warn_seconds} is not below the time limit {self.time} "
                f"({limit} s): the warning would come before the job starts"
            )
        if self.container and self.venv:
            raise ValueError("--container and --venv exclude each other: pick one environment")
        if self.mounts and not self.container:
            raise ValueError("--mounts needs --container (mounts are pyxis container mounts)")
        for item in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", item):
                raise ValueError(f"--env {item!r}: expected KEY=VALUE")

    @property
    def nproc_per_node(self) -> int:
        """Ranks torchrun starts on each node."""
        return self.gpus_per_node or self.ranks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def time_limit_s(self) -> int:
        return parse_time(self.time)

    @property
    def warning_s(self) -> int:
        """Seconds before the limit at which SLURM sends the batch shell SIGUSR1."""
        if self.warn_seconds is not None:
            return self.warn_seconds
        return max(1, min(DEFAULT_WARN_SECONDS, self.time_limit_s // 4))

    @property
    def omp_threads(self) -> int:
        """OMP_NUM_THREADS per rank: the node's CPUs shared by its ranks (1 when unknown)."""
        if not self.cpus_per_node:
            return 1
        return max(1, self.cpus_per_node // self.nproc_per_node)


def check_fits(cfg: KatConfig, spec: JobSpec) -> None:
    """Raise a one-line ValueError if `cfg` cannot run on the ranks `spec` asks for."""
    world = spec.world_size
    where = f"--nodes {spec.nodes} x {spec.nproc_per_node} ranks per node = {world} ranks"
    try:
        check_layout(cfg.model, cfg.parallel, world_size=world)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    par, t = cfg.parallel, cfg.training
    dp = world // par.model_parallel_size
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"{where}: training.global_batch_size={t.global_batch_size} is not a multiple of "
            f"training.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
        )
