"""Weight refit for an external rollout engine (e.g. vLLM on GPU clusters): the `WeightSync` hook.

`RolloutEngine(model, tok, max_sequence_length=..., weight_sync=MySync(), model_config=cfg.model)`
then `engine.refit()` after each optimizer step calls `MySync().push(state_dict, version)`.

The colocated engine reads the trainer's live parameters and needs no copy (`NoWeightSync`, the
default). An external engine instead receives the full weights under Hugging Face names (the
names `kat convert mcore-to-hf` writes, so a vLLM worker can load them with
`model.load_weights(state_dict.items())`), gathered here by `iter_hf_tensors`:

    class WeightSync(Protocol):
        def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

`push` runs on the refit owner (`is_refit_owner`: pipeline rank 0 and tensor rank 0 of its
model-parallel group; the other ranks only take part in the collectives), once per `refit()`,
with `version` counting refits. Supported: dense and MoE models with local (SequentialMLP)
experts at any TP, PP (also virtual pipeline: a list of chunks, and uneven splits: layer numbers
come from each layer's global `layer_number`) and EP; MTP heads are skipped.

How a parameter travels (one at a time, so at most about one full parameter is alive besides
what the caller keeps): it is gathered over its tensor-parallel group (the expert-TP group for
routed experts); a layer's routed experts are then broadcast over the expert-parallel group from
each EP rank in turn, under global expert indices (`ep_rank * num_local_experts + j`); with
PP > 1, the stages take turns (chunk v of stage 0, 1, .., then chunk v + 1: global layer
order), the stage whose turn it is broadcasting each tensor's (name, shape, dtype) and then the
tensor over the pipeline-parallel groups of tensor rank 0 (a `None` ends the turn).
Expert-parallel groups span data-parallel replicas: at EP > 1 every replica must iterate,
not only the first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from kat_megatron.checkpoint.hf_config import hf_spec_for
from kat_megatron.checkpoint.importer import canonical_name, partition_dim
from kat_megatron.checkpoint.mapping import OUTPUT, VOCAB_TENSORS, to_hf
from kat_megatron.config.schema import ModelConfig

Named = Iterator[tuple[str, torch.Tensor]]


@runtime_checkable
class WeightSync(Protocol):
    """Receives the trained weights (Hugging Face names, full tensors) after each refit."""

    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...


class NoWeightSync:
    """The colocated default: the engine shares the trainer's parameters, nothing to send."""

    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        return None


def is_refit_owner() -> bool:
    """Whether this rank receives the whole model from `iter_hf_tensors` and is the one to send
    it on: pipeline rank 0 and tensor rank 0 (one per data-parallel replica)."""
    return (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_pipeline_model_parallel_rank() == 0
    )


def _is_expert(name: str) -> bool:
    """A routed expert's tensor (live or canonical name; shared experts are `mlp.shared_experts`)."""
    return ".mlp.experts." in name


def _tp_group(name: str):
    """(group, size) canonical tensor `name` is sharded over: expert-TP for routed experts."""
    if _is_expert(name):
        size = parallel_state.get_expert_tensor_parallel_world_size()
        return (parallel_state.get_expert_tensor_parallel_group() if size > 1 else None), size
    size = parallel_state.get_tensor_model_parallel_world_size()
    return (parallel_state.get_tensor_model_parallel_group() if size > 1 else None), size


def _gather(local: torch.Tensor, dim: int, group, n: int) -> torch.Tensor:
    """Concatenation over `group` (of `n` ranks) of every rank's `local` along `dim`."""
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _full_tensor(name: str, param: torch.nn.Parameter, gated: bool) -> torch.Tensor:
    """The unsharded tensor of this rank's `param`, canonical tensor `name` (collective over its
    TP or expert-TP group). The split is decided by name (`importer.partition_dim`), as the
    importer shards: Megatron-Core sets `tensor_model_parallel` only when it initialises (where
    it is set, it must agree)."""
    dim = partition_dim(name)
    group, n = _tp_group(name)
    if n > 1 and getattr(param, "tensor_model_parallel", False) and param.partition_dim != dim:
        raise ValueError(
            f"weight sync: {name} is split along dim {param.partition_dim}, the export "
            f"mapping (checkpoint.importer.partition_dim) says {dim}"
        )
    if dim is None or n == 1:
        return param.detach().clone()
    if gated and name.endswith("linear_fc1.weight"):
        # Each rank holds [gate shard; up shard]: gather the halves separately.
        gate, up = param.detach().chunk(2, dim=0)
        return torch.cat([_gather(gate, dim, group, n), _gather(up, dim, group, n)], dim=0)
    return _gather(param, dim, group, n)


def _full_shape(name: str, param: torch.nn.Parameter) -> tuple[int, ...]:
    """The shape `_full_tensor(name, param, ...)` returns, without gathering."""
    shape = list(param.shape)
    dim = partition_dim(name)
    if dim is not None:
        shape[dim] *= _tp_group(name)[1]
    return tuple(shape)


def _skipped(pname: str, chunk, tied: bool) -> bool:
    """Live parameters the export has no tensor for (or has from another stage)."""
    if pname.startswith("mtp."):
        return True  # MTP heads: training-only, the rollout engine serves the main head
    if pname.startswith("embedding.") and not chunk.pre_process:
        return True  # the MTP's copy of the embedding on the last stage
    return pname == OUTPUT and tied  # the last stage's copy of the tied embedding


def _expert_tensors(experts: list, layers: list[int], cfg: ModelConfig) -> Named:
    """(canonical name, full tensor) of every EP rank's copy of the routed-expert parameters
    `experts` (this rank's (name, param) pairs of one layer): EP rank r broadcasts its own, so
    global experts come in order, one tensor at a time, the same on every rank."""
    ep = max(1, parallel_state.get_expert_model_parallel_world_size())
    me = parallel_state.get_expert_model_parallel_rank()
    group = parallel_state.get_expert_model_parallel_group() if ep > 1 else None
    tied, gated = not cfg.untie_embeddings_and_output_weights, cfg.activation == "swiglu"
    n_local = (cfg.num_moe_experts or 0) // ep
    for r in range(ep):
        for pname, param in experts:
            name = canonical_name(pname, layers, r * n_local, tied)
            if r == me:
                full = _full_tensor(name, param, gated)
            else:
                full = param.new_empty(_full_shape(name, param))
            if ep > 1:
                dist.broadcast(full, dist.get_global_rank(group, r), group=group)
            yield name, full


def _chunk_tensors(chunk, cfg: ModelConfig) -> Named:
    """(canonical name, full tensor) of this rank's model `chunk`, in parameter order (a layer's
    routed experts together, every EP rank's), collective over TP, expert-TP and EP."""
    tied, gated = not cfg.untie_embeddings_and_output_weights, cfg.activation == "swiglu"
    layers = [layer.layer_number - 1 for layer in chunk.decoder.layers]  # 1-based, global
    experts: list = []
    for pname, param in chunk.named_parameters():
        if _skipped(pname, chunk, tied):
            continue
        if _is_expert(pname):
            experts.append((pname, param))
            continue
        yield from _expert_tensors(experts, layers, cfg)
        experts = []
        name = canonical_name(pname, layers, 0, tied)
        full = _full_tensor(name, param, gated)
        yield name, full[: cfg.vocab_size] if name in VOCAB_TENSORS else full
    yield from _expert_tensors(experts, layers, cfg)


def _broadcast_object(obj, src: int, group):
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _canonical_tensors(chunks: list, cfg: ModelConfig) -> Named:
    """(canonical name, full tensor) of the whole model on ranks of tensor rank 0, of this
    rank's stage on the others (see the module doc for the order and the collectives)."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        for chunk in chunks:
            yield from _chunk_tensors(chunk, cfg)
        return
    group = parallel_state.get_pipeline_model_parallel_group()
    me = parallel_state.get_pipeline_model_parallel_rank()
    relay = parallel_state.get_tensor_model_parallel_rank() == 0  # the owner's pipeline group
    device = next(chunks[0].parameters()).device
    for chunk in chunks:  # chunk v of every stage, then v + 1: global layer order
        for stage in range(pp):
            src = dist.get_global_rank(group, stage)
            if stage == me:
                for name, full in _chunk_tensors(chunk, cfg):
                    if relay:
                        _broadcast_object((name, tuple(full.shape), full.dtype), src, group)
                        dist.broadcast(full, src, group=group)
                    yield name, full
                if relay:
                    _broadcast_object(None, src, group)
            elif relay:
                while (meta := _broadcast_object(None, src, group)) is not None:
                    name, shape, dtype = meta
                    full = torch.empty(shape, dtype=dtype, device=device)
                    dist.broadcast(full, src, group=group)
                    yield name, full


def iter_hf_tensors(model, model_config: ModelConfig | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) of the live `model` (one module or its list of virtual
    pipeline chunks), one parameter gathered at a time. Collective over the model-parallel and
    expert-parallel groups: every rank iterates in step. The owner (`is_refit_owner`) yields the
    whole model, as does every rank of tensor rank 0; other ranks yield only their own pipeline
    stage's tensors. Callers use the owner's; the order is the same on every rank."""
    if model_config is None:
        raise ValueError("weight sync: pass model_config (kat ModelConfig) to the RolloutEngine")
    chunks = unwrap_model(list(model) if isinstance(model, (list, tuple)) else [model])
    spec = hf_spec_for(model_config)
    for name, full in _canonical_tensors(chunks, model_config):
        yield from to_hf(name, full, model_config, spec)


def hf_state_dict(model, model_config: ModelConfig | None) -> dict[str, torch.Tensor]:
    """Hugging Face-named full weights of the live `model` (collective; see `iter_hf_tensors`:
    complete on the owner)."""
    return dict(iter_hf_tensors(model, model_config))
