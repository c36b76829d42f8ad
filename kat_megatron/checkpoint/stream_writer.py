"""Streaming, single-process writer of kat torch_dist checkpoints (the default of
`kat convert hf-to-mcore`, `reshard` and `upcycle-moe`).

A torch_dist checkpoint stores global tensors; the layout that wrote it only decides how they are
chunked into files, and loading reshards to any layout. So one process can write the checkpoint
a run at TP x PP x EP would, without building the model in memory:

1. build our model on the meta device (no storage) at TP=PP=EP=1, with the target TP's
   vocabulary padding, and ask Megatron-Core for its sharded state dict: the same keys, global
   shapes and chunk offsets a training save describes (SwiGLU fc1 split into gate/up, layers
   stacked or per layer, experts stacked per layer);
2. run torch.distributed.checkpoint's writer over it with a planner whose `resolve_data`
   produces each chunk only when the writer reaches it: the canonical tensor from the source
   (one cached at a time), padded and narrowed to the chunk;
3. finish as `training.checkpointing.save_checkpoint` does (kat_meta.json, then rename).

Peak memory is about one canonical tensor (plus its padded copy), not the model.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItemType
from tqdm import tqdm

from kat_megatron.checkpoint.mapping import (
    VOCAB_TENSORS,
    canonical_layer_name,
    canonical_mtp_name,
    split_mtp,
)
from kat_megatron.checkpoint.sources import TensorSource
from kat_megatron.config.schema import ModelConfig, ParallelConfig
from kat_megatron.models.builder import build_model, padded_vocab_size, transformer_config
from kat_megatron.parallel.init import initialize
from kat_megatron.training import checkpointing
from kat_megatron.training.checkpoint_meta import checkpoint_dir, write_meta

_STACKED_EXPERT = "decoder.layers.mlp.experts.experts."
_LAYER_EXPERT = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.experts\.(.+)$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MTP_EXPERT = "transformer_layer.mlp.experts.experts."


def canonical_of(key: str, offsets: tuple[int, ...]) -> tuple[str, int]:
    """(canonical name, number of leading index dims) of a chunk of checkpoint tensor `key`."""
    k, rest = split_mtp(key)
    if k is not None:  # MTP depths: per depth, routed experts stacked [E, ...]
        if rest.startswith(_MTP_EXPERT):
            w = rest[len(_MTP_EXPERT) :]
            return f"mtp.layers.{k}.transformer_layer.mlp.experts.local_experts.{offsets[0]}.{w}", 1
        return canonical_mtp_name(k, rest), 0
    if key.startswith(_STACKED_EXPERT):
        i, e = offsets[0], offsets[1]
        return f"decoder.layers.{i}.mlp.experts.local_experts.{e}.{key[len(_STACKED_EXPERT) :]}", 2
    m = _LAYER_EXPERT.match(key)
    if m:
        return f"decoder.layers.{m.group(1)}.mlp.experts.local_experts.{offsets[0]}.{m.group(2)}", 1
    m = _LAYER.match(key)
    if m:
        return canonical_layer_name(int(m.group(1)), m.group(2)), 0
    if key.startswith("decoder.layers."):
        return canonical_layer_name(offsets[0], key[len("decoder.layers.") :]), 1
    return key, 0


class _LazyPlanner(MCoreSavePlanner):
    """Megatron-Core's save planner, with tensor data produced on demand from a source."""

    def __init__(self, source: TensorSource, vocab_rows: int, bar: tqdm, **kw) -> None:
        super().__init__(**kw)
        self.source, self.vocab_rows, self.bar = source, vocab_rows, bar
        self._cached: tuple[str, torch.Tensor] | None = None

    def _full(self, name: str) -> torch.Tensor:
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # drop the previous tensor before reading the next
            full = self.source.get(name)
            if name in VOCAB_TENSORS:
                pad = full.new_zeros(self.vocab_rows - full.shape[0], *full.shape[1:])
                full = torch.cat([full, pad])
            self._cached = (name, full)
            self.bar.update()
        return self._cached[1]

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        chunk, props = write_item.tensor_data.chunk, write_item.tensor_data.properties
        name, lead = canonical_of(write_item.index.fqn, tuple(chunk.offsets))
        t = self._full(name)
        for dim, (o, s) in enumerate(zip(chunk.offsets[lead:], chunk.sizes[lead:])):
            t = t.narrow(dim, o, s)
        return t.reshape(chunk.sizes).to(props.dtype).contiguous()


class _StreamingStrategy(TorchDistSaveShardedStrategy):
    def __init__(self, planner_kw: dict) -> None:
        super().__init__("torch_dist", 1)
        self.planner_kw = planner_kw

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        planner = _LazyPlanner(flatten_state_dict=False, **self.planner_kw)
        writer = FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=False)
        dcp_save(mcore_to_pyt_state_dict(flat, False), storage_writer=writer, planner=planner)


def meta_model(model: ModelConfig, tp: int, precision: str) -> list:
    """Our model at TP=PP=EP=1 on the meta device, with TP=`tp`'s vocabulary padding."""
    padded = dataclasses.replace(
        model, backend="local", make_vocab_size_divisible_by=model.make_vocab_size_divisible_by * tp
    )
    parallel = ParallelConfig()
    initialize(parallel, seed=0, model=padded)
    config = transformer_config(padded, parallel, precision, perform_initialization=False)
    with torch.device("meta"):
        return build_model(padded, parallel, precision, config=config)


def stream_save(source: TensorSource, root: Path, tp: int, precision: str, extra: dict) -> Path:
    """Write checkpoint `root/iter_0000000` from `source`; returns its path.

    Meant for one process; on more ranks every rank joins the collective save (each is a
    data-parallel replica of the TP=PP=1 meta model, so rank 0 writes every tensor).
    """
    chunks = meta_model(source.model, tp, precision)
    rows = padded_vocab_size(source.model, tp)
    final = checkpoint_dir(root, 0)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {"model": chunks[0].sharded_state_dict(metadata=checkpointing._metadata())}
    state["rng_state"] = checkpointing._rng_state()
    state["kat"] = dict(extra, step=0, has_optimizer=False)
    content = checkpointing._metadata()
    with tqdm(desc="convert", unit="tensor", disable=not rank0) as bar:
        strategy = _StreamingStrategy({"source": source, "vocab_rows": rows, "bar": bar})
        dist_checkpointing.save(
            state, str(tmp), sharded_strategy=strategy, content_metadata=content
        )
    if rank0:
        write_meta(tmp, state["kat"])
        tmp.rename(final)
    dist.barrier()
    return final
