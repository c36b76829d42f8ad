"""Distributed checkpoints for `kat train` (`checkpoint.resume=auto`, `checkpoint.load=DIR`).

Layout under `checkpoint.dir`:

    iter_0000010/            Megatron-Core dist_checkpointing (torch_dist): model, optimizer,
                             per-rank RNG; common state: scheduler, step, consumed samples
    iter_0000010/kat_meta.json   written last: marks the checkpoint complete (step, config)
    iter_0000020.tmp/        a save in progress (or one that crashed): never loaded
    latest_checkpointed_iteration.txt   newest complete step (informational)

A save writes into `iter_N.tmp/`, waits for every rank, writes `kat_meta.json`, then renames the
directory to `iter_N` (an atomic rename on one filesystem). A crash at any point leaves the
previous complete checkpoint as the newest one `--resume auto` finds. Loading reshards across
TP/PP/EP layouts (model: always; optimizer: `fully_reshardable` distributed-optimizer format).
Where checkpoints lie and what marks one complete is `training/checkpoint_meta.py`'s; `load_checkpoint`
takes whatever its resolver accepts (one `iter_N/`, a checkpoints folder, a run directory).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

from kat_megatron.config.schema import ModelConfig, ParallelConfig
from kat_megatron.training.checkpoint_meta import (
    checkpoint_dir,
    complete_checkpoints,
    read_meta,
    resolve_checkpoint,
    write_latest,
    write_meta,
)

log = logging.getLogger(__name__)

SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _metadata() -> dict:
    """A fresh copy: Megatron-Core writes process-group handles into the dict it is given."""
    return dict(SHARDING_METADATA)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _rng_state() -> ShardedObject:
    """This rank's RNG states as a ShardedObject keyed by (pp, tp) rank, replicated over DP."""
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    pp_n = parallel_state.get_pipeline_model_parallel_world_size()
    tp_n = parallel_state.get_tensor_model_parallel_world_size()
    return ShardedObject(
        "rng_state",
        [state],
        (pp_n, tp_n),
        (pp, tp),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _set_rng_state(obj: list[dict]) -> None:
    state = obj[0]
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_state(model: list) -> dict[str, Any]:
    """Sharded state of the bare GPTModel chunks (DDP wrapping does not change the keys)."""
    states = [unwrap_model(c).sharded_state_dict(metadata=_metadata()) for c in model]
    if len(states) == 1:
        return {"model": states[0]}
    return {f"model{i}": s for i, s in enumerate(states)}


def _merged_model_state(state: dict) -> dict:
    """The model part of `state`, nested per chunk (the optimizer walks it for parameters)."""
    return {key: value for key, value in state.items() if key.startswith("model")}


def save_checkpoint(
    root: str | Path,
    step: int,
    model: list,
    optimizer,
    scheduler,
    extra: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Save a complete checkpoint for `step` (all ranks call this). Returns its directory."""
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        Path(root).mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    # Before the first optimizer step Adam has no state to save: such a checkpoint (step 0,
    # the initial weights) holds the model only.
    extra = dict(extra, step=step, has_optimizer=step > 0)
    state = _model_state(model)
    if extra["has_optimizer"]:
        state["optimizer"] = optimizer.sharded_state_dict(
            _merged_model_state(state), metadata=_metadata()
        )
        state["scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_state()
    state["kat"] = extra
    dist_checkpointing.save(state, str(tmp), content_metadata=_metadata())
    _fault_point("after_shards", step)
    _barrier()
    if _is_rank0():
        write_meta(tmp, extra)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_latest(root, step)
        if keep_last:
            for _, old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    log.info("saved checkpoint %s", final)
    return final


def load_checkpoint(
    path: str | Path,
    model: list,
    optimizer=None,
    scheduler=None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load checkpoint `path` (as `resolve_checkpoint` finds it) into `model` (and optimizer,
    scheduler, RNG when given). Returns kat extras."""
    path = resolve_checkpoint(path)
    meta = read_meta(path, need_model=False)
    with_optimizer = optimizer is not None and meta.get("has_optimizer", True)
    state = _model_state(model)
    if with_optimizer:
        _init_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            _merged_model_state(state), is_loading=True, metadata=_metadata()
        )
    if optimizer is not None:
        state["rng_state"] = _rng_state()
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{i}"  # as _model_state names them
        unwrap_model(chunk).load_state_dict(loaded[key], strict=strict)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(loaded["scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp32 main params follow the loaded weights
    if optimizer is not None:
        _set_rng_state(loaded["rng_state"])
    return dict(loaded.get("kat", {}))


def load_frozen_model(
    path: str | Path,
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: str = "auto",
    **overrides,
) -> list:
    """This rank's chunks of `model` at layout `parallel` with the weights of checkpoint `path`
    (resharded to the layout), in eval mode with gradients off: a reference policy, a KD
    teacher, an inference or verification model. Built without random initialisation (the
    weights are all overwritten); Megatron-Core's groups must be initialised for `parallel`.
    `overrides`: extra TransformerConfig fields (e.g. `variable_seq_lengths`)."""
    from kat_megatron.models.builder import build_model, transformer_config

    config = transformer_config(
        model, parallel, precision, perform_initialization=False, **overrides
    )
    chunks = build_model(model, parallel, precision, config=config)
    load_checkpoint(path, chunks)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


def _init_adam_state(optimizer) -> None:
    """Give every parameter a zero Adam state (exp_avg, exp_avg_sq, step) before a load.

    Megatron-Core's optimizers build their sharded state dict from the live state, which torch's
    Adam creates lazily at the first step; its own `init_state_fn` omits `step`, which the
    distributed optimizer's `state_dict()` requires without Apex/TE. The values are overwritten
    by the load.
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in chained:
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                st.setdefault("exp_avg", torch.zeros_like(p.data))
                st.setdefault("exp_avg_sq", torch.zeros_like(p.data))
                st.setdefault("step", torch.tensor(0.0))


def _fault_point(name: str, step: int) -> None:
    """Test hook: `KAT_FAULT_INJECT=after_shards:STEP` kills the process at that point."""
    spec = os.environ.get("KAT_FAULT_INJECT")
    if spec and spec == f"{name}:{step}":
        log.error("KAT_FAULT_INJECT: dying at %s of step %d", name, step)
        import multiprocessing

        # Die like a crashed rank, and take the save's helper processes along: an orphaned
        # helper would keep the launcher's output pipes open.
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(17)


def read_checkpoint_tensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of a torch_dist checkpoint whose key starts with `prefix`, as full tensors.

    Runs without torch.distributed (single process); for inspection and tests, not for training.
    """
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(path), str(out))
        state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if k.startswith(prefix) and torch.is_tensor(v)}
