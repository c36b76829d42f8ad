"""Read canonical tensors out of a kat torch_dist checkpoint, one at a time, in one process.

Used by `kat convert mcore-to-hf`, `reshard` and `upcycle-moe`. Megatron-Core stores decoder
layers stacked when all layers are alike: canonical `decoder.layers.7.self_attention.linear_qkv.weight`
is index 7 of checkpoint tensor `decoder.layers.self_attention.linear_qkv.weight` [L, ...], and
routed expert `decoder.layers.7.mlp.experts.local_experts.3.linear_fc1.weight` is index [7, 3] of
`decoder.layers.mlp.experts.experts.linear_fc1.weight` [L, E, ...]; with dense and MoE layers
mixed, keys are per layer (`decoder.layers.7.mlp.experts.experts.linear_fc1.weight` [E, ...]).
MTP depths are stored per depth (`mtp.layers.0.transformer_layer...`, experts [E, ...]). A read asks
torch.distributed.checkpoint for just that region, so only the stored chunks that overlap it
are loaded: peak memory is one layer's tensor, not the model. Transformer Engine names of the
fused norms (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`) are read as aliases.
"""

from __future__ import annotations

import re
from math import prod
from pathlib import Path

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from kat_megatron.checkpoint.mapping import (
    MTP_LAYER,
    TE_NORMS,
    VOCAB_TENSORS,
    canonical_shapes,
    split_layer,
    split_mtp,
)
from kat_megatron.config.schema import ModelConfig
from kat_megatron.training.checkpoint_meta import read_meta, resolve_checkpoint

_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_TE_ALIASES = {canonical: te for te, canonical in TE_NORMS.items()}


class _RegionPlanner(LoadPlanner):
    """Loads one region (offsets + dest's shape) of one checkpoint tensor into `dest`."""

    def __init__(self, key: str, offsets: tuple[int, ...], dest: torch.Tensor) -> None:
        self.key, self.offsets, self.dest = key, offsets, dest

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.dest.size())
        md = self.metadata.state_dict_metadata[self.key]
        return LoadPlan(create_read_items_for_chunk_list(self.key, md, [chunk]))

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError(f"{self.key}: unexpected bytes entry")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        return narrow_tensor_by_index(self.dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass


def _covered(md: TensorStorageMetadata, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    """True when the stored chunks cover the region exactly once (checkpoints do not overlap)."""
    total = 0
    for chunk in md.chunks:
        overlap = 1
        for o, s, co, cs in zip(offsets, sizes, chunk.offsets, chunk.sizes):
            overlap *= max(0, min(o + s, co + cs) - max(o, co))
        total += overlap
    return total == prod(sizes)


class McoreReader:
    """Canonical tensors of a kat checkpoint, read one at a time (no torch.distributed needed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_checkpoint(path)
        self.meta = read_meta(self.path)
        self.model = ModelConfig(**self.meta["config"]["model"])
        self._reader = FileSystemReader(str(self.path))
        self._md = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self._md, is_coordinator=True)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the weights were saved in (that of the embedding)."""
        return self._md.state_dict_metadata["embedding.word_embeddings.weight"].properties.dtype

    def shape(self, key: str) -> tuple[int, ...]:
        """Stored (padded, stacked) shape of checkpoint tensor `key`."""
        return tuple(self._md.state_dict_metadata[key].size)

    def names(self) -> list[str]:
        """Canonical tensor names of the checkpoint's model, in layer order."""
        return list(canonical_shapes(self.model))

    def _candidates(self, name: str) -> list[tuple[str, tuple[int, ...]]]:
        """(checkpoint key, leading index) pairs that may hold `name`: stacked layers (all
        layers alike) or per-layer keys (Megatron-Core's non-homogeneous layers, e.g. MoE with
        dense first layers), each also under its Transformer Engine alias."""
        k, rest = split_mtp(name)
        if k is not None:
            return self._mtp_candidates(k, rest)
        i, rest = split_layer(name)
        if i is None:
            return [(name, ())]
        m = _EXPERT_RE.match(rest)
        if m:
            e, w = int(m.group(1)), m.group(2)
            return [
                (f"decoder.layers.mlp.experts.experts.{w}", (i, e)),
                (f"decoder.layers.{i}.mlp.experts.experts.{w}", (e,)),
            ]
        out = []
        for r in (rest, _TE_ALIASES.get(rest)):
            if r is not None:
                out += [(f"decoder.layers.{r}", (i,)), (f"decoder.layers.{i}.{r}", ())]
        return out

    @staticmethod
    def _mtp_candidates(k: int, rest: str) -> list[tuple[str, tuple[int, ...]]]:
        """MTP depth k's layer is stored per depth (never stacked): `mtp.layers.k.<rest>`, its
        routed experts stacked as `mtp.layers.k.transformer_layer.mlp.experts.experts.<w>`."""
        p = f"mtp.layers.{k}."
        if not rest.startswith(MTP_LAYER):
            return [(p + rest, ())]
        layer = rest[len(MTP_LAYER) :]
        m = _EXPERT_RE.match(layer)
        if m:
            return [(f"{p}{MTP_LAYER}mlp.experts.experts.{m.group(2)}", (int(m.group(1)),))]
        return [(p + MTP_LAYER + r, ()) for r in (layer, _TE_ALIASES.get(layer)) if r is not None]

    def _locate(self, name: str) -> tuple[str, tuple[int, ...], TensorStorageMetadata]:
        """(checkpoint key, leading index into it, its metadata) of canonical tensor `name`."""
        for key, index in self._candidates(name):
            md = self._md.state_dict_metadata.get(key)
            if not isinstance(md, TensorStorageMetadata) or len(md.size) <= len(index):
                continue
            offsets = (*index, *[0] * (len(md.size) - len(index)))
            sizes = (*[1] * len(index), *md.size[len(index) :])
            if _covered(md, offsets, sizes):
                return key, index, md
        raise KeyError(f"{name}: not in checkpoint {self.path}")

    def get(self, name: str) -> torch.Tensor:
        """Canonical tensor `name` (full, unsharded; vocabulary padding removed)."""
        key, index, md = self._locate(name)
        shape = tuple(md.size[len(index) :])
        dest = torch.empty((*[1] * len(index), *shape), dtype=md.properties.dtype)
        planner = _RegionPlanner(key, (*index, *[0] * len(shape)), dest)
        planner.set_up_planner({}, self._md, True)
        plan = self._reader.prepare_local_plan(planner.create_local_plan())
        (plan,) = self._reader.prepare_global_plan([plan])
        self._reader.read_data(plan, planner).wait()
        t = dest.reshape(shape)
        if name in VOCAB_TENSORS and t.shape[0] != self.model.vocab_size:
            t = t[: self.model.vocab_size].clone()
        return t
