"""Weight refit for an external rollout engine (e.g. vLLM on GPU clusters): the `WeightSync` hook.

`RolloutEngine(model, tok, max_sequence_length=..., weight_sync=MySync(), model_config=cfg.model)`
then `engine.refit()` after each optimizer step calls `MySync().push(state_dict, version)`.

The colocated engine reads the trainer's live parameters and needs no copy (`NoWeightSync`, the
default). An external engine instead receives the full weights under Hugging Face names (the
names `kat convert mcore-to-hf` writes, so a vLLM worker can load them with
`model.load_weights(state_dict.items())`), gathered over tensor parallelism here:

    class WeightSync(Protocol):
        def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

`push` runs on the first rank of the first tensor-parallel group (the other ranks only take part
in the gathers), once per `refit()`, with `version` counting refits. Supported: dense and MoE
models with local (SequentialMLP) experts at any TP and EP=1; pipeline parallelism is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from kat_megatron.checkpoint.hf_config import hf_spec_for
from kat_megatron.checkpoint.mapping import VOCAB_TENSORS, canonical_layer_name, split_layer, to_hf
from kat_megatron.config.schema import ModelConfig


@runtime_checkable
class WeightSync(Protocol):
    """Receives the trained weights (Hugging Face names, full tensors) after each refit."""

    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...


class NoWeightSync:
    """The colocated default: the engine shares the trainer's parameters, nothing to send."""

    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        return None


def _gather(local: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenation over `group` of every rank's `local` along `dim`."""
    n = dist.get_world_size(group) if group is not None else 1
    if n == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _full_tensor(name: str, param: torch.nn.Parameter, gated: bool) -> torch.Tensor:
    """The unsharded tensor of `param` (TP or expert-TP sharded, or replicated)."""
    if not getattr(param, "tensor_model_parallel", False):
        return param.detach().clone()
    expert = not getattr(param, "allreduce", True)
    group = (
        parallel_state.get_expert_tensor_parallel_group()
        if expert
        else parallel_state.get_tensor_model_parallel_group()
    )
    dim = param.partition_dim
    if gated and name.endswith("linear_fc1.weight"):
        # Each rank holds [gate shard; up shard]: gather the halves separately.
        gate, up = param.chunk(2, dim=0)
        return torch.cat([_gather(gate, dim, group), _gather(up, dim, group)], dim=0)
    return _gather(param, dim, group)


def canonical_name(name: str) -> str:
    """Canonical tensor name of a live `GPTModel` parameter name (pp = 1, ep = 1)."""
    i, rest = split_layer(name)
    return name if i is None else canonical_layer_name(i, rest)


def iter_hf_tensors(model, model_config: ModelConfig | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) of the live `model`, one parameter gathered at a time
    (collective over TP: every rank of the group iterates in step), so at most one parameter's
    full copy is alive per iteration unless the caller keeps them."""
    if model_config is None:
        raise ValueError("weight sync: pass model_config (kat ModelConfig) to the RolloutEngine")
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("weight sync: pipeline parallelism is not supported")
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        raise ValueError("weight sync: expert parallelism is not supported (ep must be 1)")
    spec = hf_spec_for(model_config)
    gated = model_config.activation == "swiglu"
    for name, param in model.named_parameters():
        if name.startswith("mtp."):
            continue  # MTP heads: training-only, the rollout engine serves the main head
        full = _full_tensor(name, param, gated)
        name = canonical_name(name)
        if name in VOCAB_TENSORS:
            full = full[: model_config.vocab_size]
        yield from to_hf(name, full, model_config, spec)


def hf_state_dict(model, model_config: ModelConfig | None) -> dict[str, torch.Tensor]:
    """Hugging Face-named full weights of the live `model` (collective over TP)."""
    return dict(iter_hf_tensors(model, model_config))
