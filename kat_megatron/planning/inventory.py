"""The parameters one rank holds, in Megatron-Core's order: input to `kat plan`'s memory estimate.

`stage_inventory(model, layout, pp_rank)` lists, for each model chunk (virtual stage) of pipeline
rank `pp_rank`, the local (TP/EP/ETP-sharded) parameters in `named_parameters()` order of a
Megatron-Core `GPTModel` built by `kat_megatron.models.builder` with the local spec. Layers are
grouped (a run of identical layers is one `Group` with a count) so a 96-layer, 64-expert model
costs a few dozen entries; `Group.expand()` gives the named list that
`tests/planning/test_static_memory.py` compares against real ranks.

Which parameters are where (Megatron-Core 0.16.1): the word embedding (V_pad/TP x h) on the first
stage, and also on the last stage when MTP is on and PP > 1 (the MTP heads embed the shifted
tokens there); the output layer (V_pad/TP x h) on the last stage unless the embeddings are tied
and the stage also embeds; the final norm and the MTP heads on the last virtual stage of the last
pipeline rank. Expert weights are flagged `expert` (their own DDP buffer, reduced over the
expert-data-parallel group) only when EP > 1, as Megatron-Core sets `allreduce=False` then.
The TE spec fuses norms into the next linear layer and groups experts into `weight0..N`: the
same parameter sizes in a different order, so buffer totals are identical to the local spec's
(see `static.py`); only shard boundaries inside a buffer move.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from kat_megatron.config.schema import ModelConfig, ParallelConfig, pipeline_split
from kat_megatron.models.builder import padded_vocab_size
from kat_megatron.models.params import moe_pattern
from kat_megatron.planning.layout import Layout


@dataclass(frozen=True)
class ParamSpec:
    """One local parameter: name (relative to its layer), elements, and DDP buffer traits."""

    name: str
    numel: int
    expert: bool = False
    """In the expert-parallel DDP buffer (EP > 1 expert weights)."""
    shared_embedding: bool = False
    """Megatron's `shared_embedding`: own bucket under the distributed optimizer."""


@dataclass(frozen=True)
class Group:
    """`count` consecutive layers (or one non-layer module when prefix has no `{}`)."""

    prefix: str
    params: tuple[ParamSpec, ...]
    count: int = 1
    first: int = 0

    def expand(self) -> Iterator[ParamSpec]:
        for i in range(self.first, self.first + self.count):
            pre = self.prefix.format(i)
            for p in self.params:
                yield ParamSpec(pre + p.name, p.numel, p.expert, p.shared_embedding)

    @property
    def numel(self) -> int:
        return self.count * sum(p.numel for p in self.params)


def _norm(model: ModelConfig, name: str) -> list[ParamSpec]:
    h = model.hidden_size
    out = [ParamSpec(f"{name}.weight", h)]
    if model.normalization == "LayerNorm":
        out.append(ParamSpec(f"{name}.bias", h))
    return out


def _mlp(h: int, ffn: int, split: int, swiglu: bool, prefix: str, expert: bool) -> list[ParamSpec]:
    fc1_out = (2 if swiglu else 1) * ffn // split
    return [
        ParamSpec(f"{prefix}linear_fc1.weight", fc1_out * h, expert),
        ParamSpec(f"{prefix}linear_fc2.weight", h * (ffn // split), expert),
    ]


def model_key(model: ModelConfig) -> tuple:
    """A hashable snapshot of `model`'s fields (for caches: the planner asks thousands of times)."""
    return tuple(vars(model).values())


_PATTERNS: dict[tuple, tuple[int, ...]] = {}
_LAYERS: dict[tuple, tuple[ParamSpec, ...]] = {}


def layer_pattern(model: ModelConfig) -> tuple[int, ...]:
    """1 for MoE layers, 0 for dense ones (`models.params.moe_pattern`, cached)."""
    key = model_key(model)
    if key not in _PATTERNS:
        _PATTERNS[key] = tuple(moe_pattern(model))
    return _PATTERNS[key]


def layer_params(model: ModelConfig, layout: Layout, moe: bool) -> tuple[ParamSpec, ...]:
    """Local parameters of one transformer layer, in `named_parameters()` order (cached)."""
    key = (model_key(model), layout.tp, layout.ep, layout.etp_size, moe)
    if key not in _LAYERS:
        _LAYERS[key] = _layer_params(model, layout, moe)
    return _LAYERS[key]


def _layer_params(model: ModelConfig, layout: Layout, moe: bool) -> tuple[ParamSpec, ...]:
    h, d, tp = model.hidden_size, model.head_dim, layout.tp
    nq, nkv = model.num_attention_heads, model.num_query_groups
    qkv = (nq + 2 * nkv) * d // tp
    out = _norm(model, "input_layernorm")
    out.append(ParamSpec("self_attention.linear_proj.weight", h * nq * d // tp))
    out.append(ParamSpec("self_attention.linear_qkv.weight", qkv * h))
    if model.add_qkv_bias:
        out.append(ParamSpec("self_attention.linear_qkv.bias", qkv))
    if getattr(model, "qk_layernorm", False):  # one norm of width d, shared by all heads
        out += [ParamSpec(f"self_attention.{n}_layernorm.weight", d) for n in ("q", "k")]
    out += _norm(model, "pre_mlp_layernorm")
    swiglu = model.activation == "swiglu"
    if not moe:
        return tuple(out + _mlp(h, model.ffn_hidden_size, tp, swiglu, "mlp.", False))
    out.append(ParamSpec("mlp.router.weight", model.num_moe_experts * h))
    expert = layout.ep > 1
    ffn_e = model.moe_ffn_hidden_size or model.ffn_hidden_size
    for i in range(model.num_moe_experts // layout.ep):
        prefix = f"mlp.experts.local_experts.{i}."
        out += _mlp(h, ffn_e, layout.etp_size, swiglu, prefix, expert)
    shared = model.moe_shared_expert_intermediate_size
    if shared:
        out += _mlp(h, shared, tp, swiglu, "mlp.shared_experts.", False)
    return tuple(out)


@functools.cache
def _split(num_layers: int, pp: int, vpp: int | None, first, last, emb: bool, loss: bool):
    par = ParallelConfig(
        pp=pp,
        vpp=vpp,
        first_stage_layers=first,
        last_stage_layers=last,
        account_for_embedding_in_pipeline_split=emb,
        account_for_loss_in_pipeline_split=loss,
    )
    return tuple(pipeline_split(num_layers, par))


def stage_layer_counts(model: ModelConfig, layout: Layout) -> tuple[int, ...]:
    """Decoder layers on each pipeline rank (`config.schema.pipeline_split`: even, the layout's
    first/last stage counts with the middle stages sharing the rest, or an even split of the
    layers plus the embedding and/or loss, which take a layer's place on the first/last rank)."""
    return _split(
        model.num_layers,
        layout.pp,
        layout.vpp,
        layout.first_stage_layers,
        layout.last_stage_layers,
        layout.account_for_embedding_in_pipeline_split,
        layout.account_for_loss_in_pipeline_split,
    )


def chunk_layers(model: ModelConfig, layout: Layout, pp_rank: int, vp: int) -> range:
    """Global indices of the decoder layers in virtual stage `vp` of pipeline rank `pp_rank`.

    Megatron-Core's `get_transformer_layer_offset` / `get_num_layers_to_build`: each rank's
    layers fall into `vpp` equal chunks, and chunk `vp` of every rank, in rank order, covers
    layers [vp*L/vpp, (vp+1)*L/vpp). With the embedding (loss) counted as a layer the same holds
    for the L + 1 (+ 1) slots, slot 0 being the embedding (the last one the loss), so the first
    (last) chunk builds one layer fewer (tests/planning/test_layouts.py checks both)."""
    if layout.accounted:
        emb = int(layout.account_for_embedding_in_pipeline_split)
        loss = int(layout.account_for_loss_in_pipeline_split)
        slots = model.num_layers + emb + loss
        per_chunk = slots // (layout.pp * layout.chunks)
        start = vp * (slots // layout.chunks) + pp_rank * per_chunk
        first, last = (pp_rank, vp) == (0, 0), (pp_rank, vp) == (layout.pp - 1, layout.chunks - 1)
        n = per_chunk - (emb if first else 0) - (loss if last else 0)
        start -= 0 if first else emb
        return range(start, start + n)
    per_chunk = [n // layout.chunks for n in stage_layer_counts(model, layout)]
    start = vp * (model.num_layers // layout.chunks) + sum(per_chunk[:pp_rank])
    return range(start, start + per_chunk[pp_rank])


def _decoder_groups(model: ModelConfig, layout: Layout, layers: range) -> list[Group]:
    """Runs of identical consecutive layers; names use the chunk-local layer index."""
    pattern = layer_pattern(model)
    kinds = {k: layer_params(model, layout, bool(k)) for k in {pattern[i] for i in layers}}
    groups: list[Group] = []
    for local, idx in enumerate(layers):
        params = kinds[pattern[idx]]
        if groups and groups[-1].params is params:
            last = groups[-1]
            groups[-1] = Group(last.prefix, params, last.count + 1, last.first)
        else:
            groups.append(Group("decoder.layers.{}.", params, 1, local))
    return groups


def _mtp_groups(model: ModelConfig, layout: Layout) -> list[Group]:
    h = model.hidden_size
    moe_last = bool(layer_pattern(model)[-1])
    head = _norm(model, "enorm") + _norm(model, "hnorm")
    head.append(ParamSpec("eh_proj.weight", (h // layout.tp) * 2 * h))
    inner = tuple(
        ParamSpec("transformer_layer." + p.name, p.numel, p.expert)
        for p in layer_params(model, layout, moe_last)
    )
    return [
        Group("mtp.layers.{}.", (*head, *inner, *_norm(model, "final_layernorm")), count=1, first=i)
        for i in range(model.mtp_num_layers or 0)
    ]


def chunk_inventory(model: ModelConfig, layout: Layout, pp_rank: int, vp: int) -> list[Group]:
    """Parameter groups of one model chunk, in `named_parameters()` order."""
    pre = pp_rank == 0 and vp == 0
    post = pp_rank == layout.pp - 1 and vp == layout.chunks - 1
    mtp = post and bool(model.mtp_num_layers)
    tied = not model.untie_embeddings_and_output_weights
    vocab_rows = padded_vocab_size(model, layout.tp) // layout.tp
    emb = vocab_rows * model.hidden_size
    # Megatron marks the embedding/output weight `shared_embedding` when it is tied across
    # stages: PP > 1 and (tied embeddings, or MTP needing the embedding on the last stage).
    shared = layout.pp > 1 and (tied or bool(model.mtp_num_layers))
    groups: list[Group] = []
    if pre or mtp:
        groups.append(
            Group("embedding.", (ParamSpec("word_embeddings.weight", emb, False, shared),))
        )
    groups += _decoder_groups(model, layout, chunk_layers(model, layout, pp_rank, vp))
    if post:
        groups.append(Group("decoder.", tuple(_norm(model, "final_layernorm"))))
    if mtp:
        groups += _mtp_groups(model, layout)
    if post and not (tied and pre):
        # A tied output layer off the first stage is the embedding's copy, unless MTP's
        # embedding on this stage takes that role (Megatron-Core's setup_embeddings...).
        out_shared = tied and layout.pp > 1 and not mtp
        groups.append(Group("", (ParamSpec("output_layer.weight", emb, False, out_shared),)))
    return groups


def stage_inventory(model: ModelConfig, layout: Layout, pp_rank: int) -> list[list[Group]]:
    """Parameter groups of each model chunk on pipeline rank `pp_rank` (one list per chunk)."""
    return [chunk_inventory(model, layout, pp_rank, vp) for vp in range(layout.chunks)]


def expand(chunk: list[Group]) -> list[ParamSpec]:
    """The chunk's parameters one by one, with full names."""
    return [p for g in chunk for p in g.expand()]
