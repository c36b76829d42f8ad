"""Write a kat checkpoint from a tensor source: `kat convert hf-to-mcore|reshard|upcycle-moe`.

Two engines produce the same checkpoint (tests/checkpoint/test_convert.py compares them):

- `run_stream_import` (the default): one process, nothing built in memory (`stream_writer`).
- `run_import` (`--ranks`): every rank of a tp * pp * dp launch builds its pipeline stage of
  Megatron-Core's `GPTModel` (no random initialisation), reads each of its parameters' canonical
  tensor from the source, pads the vocabulary, takes this rank's slice and copies it in; then
  `training.checkpointing.save_checkpoint` writes it exactly as training does. A rank holds its
  model shard plus one full tensor.

Either way `OUT` appears only when complete (built under `OUT.tmp/`), holds `kat_meta.json` with
the run config and a `config.yaml`, and `kat train OUT/config.yaml checkpoint.load=OUT` loads it
at any layout whose TP pads the vocabulary alike (`kat convert reshard` changes the padding).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from kat_megatron.checkpoint.mapping import (
    EMBEDDING,
    MTP_LAYER,
    OUTPUT,
    VOCAB_TENSORS,
    canonical_layer_name,
    canonical_mtp_name,
    split_mtp,
)
from kat_megatron.checkpoint.sources import TensorSource
from kat_megatron.config.loader import config_to_dict, dump_config
from kat_megatron.config.schema import (
    DataConfig,
    KatConfig,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
)
from kat_megatron.models.builder import build_model, padded_vocab_size, transformer_config
from kat_megatron.parallel.init import initialize
from kat_megatron.training.checkpointing import save_checkpoint

log = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_TE_EXPERT_RE = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


@dataclass
class ImportJob:
    """One conversion into a kat checkpoint, as every rank sees it."""

    out: str
    """Checkpoint directory to create (holds kat_meta.json, config.yaml and the shards)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = "fp32"
    """Parameter dtype of the saved checkpoint: bf16, fp16 or fp32."""
    provenance: dict = field(default_factory=dict)
    """What was converted (recorded in kat_meta.json under `converted_from`)."""
    tokenizer: str | None = None
    """The source's tokenizer, recorded as the run config's `data.tokenizer` (what
    `kat convert mcore-to-hf` exports); None: the default (`tiny`)."""


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _global_experts(rest: str, expert_offset: int) -> str:
    """A layer tensor's name with this rank's local expert index made global."""
    e = _LOCAL_EXPERT_RE.match(rest)
    if e:
        rest = f"mlp.experts.local_experts.{expert_offset + int(e.group(1))}.{e.group(2)}"
    e = _TE_EXPERT_RE.match(rest)
    if e:
        rest = f"mlp.experts.local_experts.{expert_offset + int(e.group(2))}.{e.group(1)}.weight"
    return rest


def canonical_name(pname: str, layer_numbers: list[int], expert_offset: int, tied: bool) -> str:
    """Canonical name of a parameter of this rank's model chunk (local or TE spec)."""
    if pname == OUTPUT and tied:
        return EMBEDDING  # the last stage's copy of the tied embedding
    k, rest = split_mtp(pname)  # MTP depths: numbered globally on the last stage
    if k is not None:
        if rest.startswith(MTP_LAYER):
            rest = MTP_LAYER + _global_experts(rest[len(MTP_LAYER) :], expert_offset)
        return canonical_mtp_name(k, rest)
    m = _LAYER_RE.match(pname)
    if not m:
        return pname
    i, rest = layer_numbers[int(m.group(1))], m.group(2)
    return canonical_layer_name(i, _global_experts(rest, expert_offset))


def partition_dim(name: str) -> int | None:
    """The dim canonical tensor `name` is split along over TP (ETP for experts); None: replicated.

    Decided by name, not by Megatron's `tensor_model_parallel` attributes, which Megatron-Core
    only sets when it initialises the weights (we build with `perform_initialization=False`).
    """
    if name in VOCAB_TENSORS or re.search(
        r"(linear_qkv\.(weight|bias)|linear_fc1\.weight|eh_proj\.weight)$", name
    ):
        return 0  # eh_proj (MTP) is column-parallel too
    if re.search(r"(linear_proj|linear_fc2)\.weight$", name):
        return 1
    return None


def local_shard(full: torch.Tensor, name: str, model: ModelConfig) -> torch.Tensor:
    """This rank's slice of canonical tensor `full` (vocabulary padded first)."""
    if ".mlp.experts." in name:
        size = parallel_state.get_expert_tensor_parallel_world_size()
        rank = parallel_state.get_expert_tensor_parallel_rank()
    else:
        size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
    if name in VOCAB_TENSORS:
        rows = padded_vocab_size(model, size)
        full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
    dim = partition_dim(name)
    if dim is None or size == 1:
        return full
    if full.shape[dim] % size:
        raise ValueError(f"{name}: dim {dim} of {list(full.shape)} does not divide into {size}")
    if name.endswith("linear_fc1.weight") and model.activation == "swiglu":
        # a rank holds [its gate rows; its up rows]
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)])
    return full.chunk(size, dim=dim)[rank]


@torch.no_grad()
def fill_model(chunks: list, source: TensorSource, model: ModelConfig) -> int:
    """Copy every parameter of this rank's chunks from `source`. Returns the count filled."""
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep = parallel_state.get_expert_model_parallel_world_size()
    expert_offset = ep_rank * (model.num_moe_experts or 0) // ep
    tied = not model.untie_embeddings_and_output_weights
    params = []
    for chunk in chunks:
        layers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        for pname, param in chunk.named_parameters():
            params.append((canonical_name(pname, layers, expert_offset, tied), param))
    for name, param in tqdm(params, desc="fill", unit="tensor", disable=not _rank0()):
        full = source.get(name)
        local = local_shard(full, name, model)
        if tuple(local.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: shape mismatch: the source gives {list(full.shape)}, i.e. "
                f"{list(local.shape)} on this rank, but the model expects {list(param.shape)}"
            )
        param.copy_(local)
    return len(params)


def build_empty(model: ModelConfig, parallel: ParallelConfig, precision: str) -> list:
    """Initialise the groups for `parallel` and build this rank's chunks without random init."""
    initialize(parallel, seed=0, model=model)
    config = transformer_config(model, parallel, precision, perform_initialization=False)
    return build_model(model, parallel, precision, config=config)


def _run_config(model: ModelConfig, job: ImportJob) -> tuple[KatConfig, dict]:
    """The run config recorded with a converted checkpoint, and its kat_meta extras."""
    cfg = KatConfig(
        model=model,
        parallel=job.parallel,
        training=TrainingConfig(precision=job.precision),
        data=DataConfig(tokenizer=job.tokenizer) if job.tokenizer else DataConfig(),
    )
    extra = {"consumed_samples": 0, "config": config_to_dict(cfg), "converted_from": job.provenance}
    return cfg, extra


def _publish(path: Path, out: Path, cfg: KatConfig) -> None:
    """Rank 0: add config.yaml to the finished checkpoint `path` and move it to `out`."""
    dump_config(cfg, path / "config.yaml")
    if out.exists():
        shutil.rmtree(out)
    os.replace(path, out)
    shutil.rmtree(path.parent)


def save_converted(chunks: list, model: ModelConfig, job: ImportJob) -> Path:
    """Save `chunks` as checkpoint directory `job.out` (built in OUT.tmp, renamed when done)."""
    out = Path(job.out)
    root = out.with_name(out.name + ".tmp")
    if _rank0():
        shutil.rmtree(root, ignore_errors=True)
    cfg, extra = _run_config(model, job)
    path = save_checkpoint(root, 0, chunks, None, None, extra)
    if _rank0():
        _publish(path, out, cfg)
    if dist.is_initialized():
        dist.barrier()
    log.info("wrote %s", out)
    return out


def run_import(source: TensorSource, job: ImportJob) -> Path:
    """Every rank: build at `job.parallel`, fill from `source`, save to `job.out`."""
    chunks = build_empty(source.model, job.parallel, job.precision)
    fill_model(chunks, source, source.model)
    return save_converted(chunks, source.model, job)


def run_stream_import(source: TensorSource, job: ImportJob) -> Path:
    """Write `job.out` from `source` without building the model (see `stream_writer`)."""
    from kat_megatron.checkpoint.stream_writer import stream_save

    out = Path(job.out)
    root = out.with_name(out.name + ".tmp")
    if _rank0():
        shutil.rmtree(root, ignore_errors=True)
    cfg, extra = _run_config(source.model, job)
    path = stream_save(source, root, job.parallel.tp, job.precision, extra)
    if _rank0():
        _publish(path, out, cfg)
    dist.barrier()
    log.info("wrote %s", out)
    return out
