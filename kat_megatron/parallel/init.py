"""Distributed start-up for every kat job (`kat train cfg.yaml --nproc N`, torchrun or SLURM).

`initialize(parallel, seed)` joins the process group described by the environment (torchrun's
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, or SLURM's SLURM_PROCID/SLURM_NTASKS), or starts a
one-rank group when there is none; picks NCCL on CUDA and gloo otherwise (applying the CPU
adaptation layer); then initialises Megatron-Core's model-parallel groups and RNG seeds.
"""

from __future__ import annotations

import datetime
import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from kat_megatron.config.schema import ParallelConfig, check_layout
from kat_megatron.parallel import mcore_compat
from kat_megatron.utils.io import free_port

log = logging.getLogger(__name__)


def _env_rank_world() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def resolve_dist_backend(parallel: ParallelConfig) -> str:
    if parallel.dist_backend != "auto":
        if parallel.dist_backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("parallel.dist_backend=nccl needs CUDA; use gloo (or auto) on CPU")
        return parallel.dist_backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(parallel: ParallelConfig, timeout_s: int = 600) -> tuple[int, int]:
    """Join (or create) the default process group; returns (rank, world_size)."""
    backend = resolve_dist_backend(parallel)
    if not torch.cuda.is_available():
        from kat_megatron.parallel import cpu_adapter

        cpu_adapter.apply()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world, local_rank = _env_rank_world()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        init_method = f"tcp://127.0.0.1:{free_port()}"
    else:
        os.environ.setdefault("MASTER_PORT", "29500")
        init_method = "env://"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return rank, world


def initialize(parallel: ParallelConfig, seed: int, model=None) -> int:
    """Process group + Megatron-Core model-parallel groups + seeds. Returns the DP size."""
    _, world = init_process_group(parallel)
    mcore_compat.apply()
    if model is not None:
        check_layout(model, parallel, world_size=world)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**parallel.mcore_sizes())
    set_seed(seed)
    return parallel_state.get_data_parallel_world_size()


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch (per pipeline stage, as Megatron-LM) and the TP RNG tracker."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def shutdown() -> None:
    """Destroy Megatron's groups and the default process group (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
