"""Canonical Megatron tensors <-> Hugging Face tensors (Qwen2, Qwen3-MoE): `kat convert ...`.

A canonical tensor is one full Megatron parameter with global layer/expert indices, in
Megatron's layout and without vocabulary padding (see `kat_megatron/checkpoint/__init__.py`):

| canonical (`decoder.layers.i.` omitted)      | Hugging Face (`model.layers.i.` omitted)   |
|----------------------------------------------|--------------------------------------------|
| `embedding.word_embeddings.weight`           | `model.embed_tokens.weight`                |
| `input_layernorm.weight`                     | `input_layernorm.weight`                   |
| `self_attention.linear_qkv.weight` / `.bias` | `self_attn.{q,k,v}_proj.weight` / `.bias`  |
| `self_attention.{q,k}_layernorm.weight`      | `self_attn.{q,k}_norm.weight`              |
| `self_attention.linear_proj.weight`          | `self_attn.o_proj.weight` (+ zero `.bias`) |
| `pre_mlp_layernorm.weight`                   | `post_attention_layernorm.weight`          |
| `mlp.linear_fc1.weight` = [gate; up]         | `mlp.gate_proj.weight`, `mlp.up_proj.weight` |
| `mlp.linear_fc2.weight`                      | `mlp.down_proj.weight`                     |
| `mlp.router.weight`                          | `mlp.gate.weight`                          |
| `mlp.experts.local_experts.e.linear_fc1/2`   | `mlp.experts.e.{gate,up,down}_proj.weight` |
| `decoder.final_layernorm.weight`             | `model.norm.weight`                        |
| `output_layer.weight` (untied only)          | `lm_head.weight`                           |

MTP depth k (`model.mtp_num_layers`; written to the export's `mtp/` folder, see
`checkpoint/hf_mtp.py`): canonical `mtp.layers.k.{enorm,hnorm,eh_proj}.weight`,
`mtp.layers.k.transformer_layer.<layer tensor>` and `mtp.layers.k.final_layernorm.weight` are
HF `mtp.layers.k.{enorm,hnorm,eh_proj}.weight`, `mtp.layers.k.<the layer's HF names above>` and
`mtp.layers.k.shared_head.norm.weight` (DeepSeek-V3's names for its MTP module, under
`mtp.layers.k.` instead of `model.layers.{L+k}.`); the embedding and output layer are shared.

Megatron's fused QKV is interleaved per KV group: for each of the `ng` groups, that group's
`nq/ng` query heads, then its key head, then its value head (rows of `head_dim` each).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from kat_megatron.checkpoint.hf_config import HFSpec
from kat_megatron.config.schema import ModelConfig

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
VOCAB_TENSORS = (EMBEDDING, OUTPUT)
TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
"""Transformer Engine's names of the norms it fuses into the next linear -> canonical names."""
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MTP_RE = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
MTP_LAYER = "transformer_layer."
"""What follows `mtp.layers.k.` in the names of an MTP depth's transformer layer."""
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
            "eh_proj.weight": "eh_proj.weight", "final_layernorm.weight": "shared_head.norm.weight"}  # fmt: skip
"""An MTP depth's own tensors (canonical rest -> HF rest)."""
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")

Tensors = list[tuple[str, torch.Tensor]]


def split_layer(name: str) -> tuple[int | None, str]:
    """(global layer index, rest) of a canonical name; (None, name) outside the layers."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def canonical_layer_name(i: int, rest: str) -> str:
    """`decoder.layers.{i}.{rest}`, with Transformer Engine norm names made canonical."""
    return f"decoder.layers.{i}.{TE_NORMS.get(rest, rest)}"


def split_mtp(name: str) -> tuple[int | None, str]:
    """(MTP depth, rest) of a canonical `mtp.layers.k.<rest>` name; (None, name) otherwise."""
    m = _MTP_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def canonical_mtp_name(k: int, rest: str) -> str:
    """`mtp.layers.{k}.{rest}`, with Transformer Engine norm names of its layer made canonical."""
    if rest.startswith(MTP_LAYER):
        layer = rest[len(MTP_LAYER) :]
        rest = MTP_LAYER + TE_NORMS.get(layer, layer)
    return f"mtp.layers.{k}.{rest}"


def is_mtp(name: str) -> bool:
    """Canonical (or HF) tensor `name` belongs to an MTP depth."""
    return name.startswith("mtp.")


def is_moe_layer(model: ModelConfig, i: int) -> bool:
    """Layer `i` is MoE (the rule of `kat_megatron.models.builder.moe_layer_freq`)."""
    return model.is_moe and i >= model.moe_first_k_dense and i % model.moe_layer_freq == 0


def _mlp_shapes(prefix: str, h: int, f: int, glu: bool) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "linear_fc1.weight": ((2 if glu else 1) * f, h),
        prefix + "linear_fc2.weight": (h, f),
    }


def _layer_shapes(model: ModelConfig, p: str, moe: bool) -> dict[str, tuple[int, ...]]:
    """The canonical tensors of one transformer layer, names prefixed with `p`."""
    h, d = model.hidden_size, model.head_dim
    nq, ng, glu = model.num_attention_heads, model.num_query_groups, model.activation == "swiglu"
    qkv = (nq + 2 * ng) * d
    out: dict[str, tuple[int, ...]] = {p + "input_layernorm.weight": (h,)}
    out[p + "self_attention.linear_qkv.weight"] = (qkv, h)
    if model.add_qkv_bias:
        out[p + "self_attention.linear_qkv.bias"] = (qkv,)
    if model.qk_layernorm:
        out[p + "self_attention.q_layernorm.weight"] = (d,)
        out[p + "self_attention.k_layernorm.weight"] = (d,)
    out[p + "self_attention.linear_proj.weight"] = (h, nq * d)
    out[p + "pre_mlp_layernorm.weight"] = (h,)
    if not moe:
        out.update(_mlp_shapes(p + "mlp.", h, model.ffn_hidden_size, glu))
        return out
    out[p + "mlp.router.weight"] = (model.num_moe_experts, h)
    fe = model.moe_ffn_hidden_size or model.ffn_hidden_size
    for e in range(model.num_moe_experts):
        out.update(_mlp_shapes(f"{p}mlp.experts.local_experts.{e}.", h, fe, glu))
    if model.moe_shared_expert_intermediate_size:
        fs = model.moe_shared_expert_intermediate_size
        out.update(_mlp_shapes(p + "mlp.shared_experts.", h, fs, glu))
    return out


def mtp_is_moe(model: ModelConfig) -> bool:
    """The MTP depths' layers are MoE (they copy the decoder's last layer; models/specs.py)."""
    return is_moe_layer(model, model.num_layers - 1)


def canonical_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of `model` with its full shape: the decoder in layer order, then
    the MTP depths in depth order."""
    h = model.hidden_size
    out: dict[str, tuple[int, ...]] = {EMBEDDING: (model.vocab_size, h)}
    for i in range(model.num_layers):
        out.update(_layer_shapes(model, f"decoder.layers.{i}.", is_moe_layer(model, i)))
    out[FINAL_NORM] = (h,)
    if model.untie_embeddings_and_output_weights:
        out[OUTPUT] = (model.vocab_size, h)
    for k in range(model.mtp_num_layers or 0):
        p = f"mtp.layers.{k}."
        out.update({p + "enorm.weight": (h,), p + "hnorm.weight": (h,)})
        out[p + "eh_proj.weight"] = (h, 2 * h)
        out.update(_layer_shapes(model, p + MTP_LAYER, mtp_is_moe(model)))
        out[p + "final_layernorm.weight"] = (h,)
    return out


def qkv_to_hf(t: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Megatron's per-group interleaved QKV (weight or bias) -> (q, k, v) as HF stores them."""
    ng, d = model.num_query_groups, model.head_dim
    per = model.num_attention_heads // ng
    x = t.reshape(ng, (per + 2) * d, *t.shape[1:])
    q, k, v = x.split([per * d, d, d], dim=1)
    return tuple(y.reshape(-1, *t.shape[1:]).contiguous() for y in (q, k, v))


def qkv_from_hf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig):
    """(q, k, v) projections (weights or biases) -> Megatron's per-group interleaved QKV."""
    ng, rest = model.num_query_groups, q.shape[1:]
    parts = [y.reshape(ng, -1, *rest) for y in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
}


def _layer_keys(rest: str, model: ModelConfig, spec: HFSpec) -> list[str]:
    """HF keys (relative to `model.layers.i.`) holding one canonical layer tensor, in order.

    Keys past the first two (QKV: three) are zero biases the HF model has and ours lacks.
    """
    if rest in _SIMPLE:
        return [_SIMPLE[rest]]
    if rest.startswith("self_attention.linear_qkv."):
        kind = rest.rsplit(".", 1)[1]
        keys = [f"self_attn.{n}_proj.{kind}" for n in "qkv"]
        if kind == "weight" and spec.qkv_bias and not model.add_qkv_bias:
            keys += [f"self_attn.{n}_proj.bias" for n in "qkv"]
        return keys
    if rest == "self_attention.linear_proj.weight":
        return ["self_attn.o_proj.weight"] + (["self_attn.o_proj.bias"] if spec.o_bias else [])
    if rest == "mlp.linear_fc1.weight":
        return ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
    m = _EXPERT_RE.match(rest)
    if m:
        e, which = m.groups()
        names = ["down_proj"] if which == "linear_fc2" else ["gate_proj", "up_proj"]
        return [f"mlp.experts.{e}.{n}.weight" for n in names]
    raise ValueError(f"{spec.arch} has no counterpart for Megatron tensor {rest!r}")


def hf_keys(name: str, model: ModelConfig, spec: HFSpec) -> list[str]:
    """The Hugging Face keys that hold canonical tensor `name` (see `_layer_keys`)."""
    top = {EMBEDDING: "model.embed_tokens.weight", FINAL_NORM: "model.norm.weight"}
    if name in top:
        return [top[name]]
    if name == OUTPUT:
        return ["lm_head.weight"]
    k, rest = split_mtp(name)
    if k is not None:
        if rest in _MTP_OWN:
            return [f"mtp.layers.{k}.{_MTP_OWN[rest]}"]
        if rest.startswith(MTP_LAYER):
            layer = _layer_keys(rest[len(MTP_LAYER) :], model, spec)
            return [f"mtp.layers.{k}.{key}" for key in layer]
        raise ValueError(f"{spec.arch} export has no counterpart for MTP tensor {name!r}")
    i, rest = split_layer(name)
    if i is None:
        raise ValueError(f"{spec.arch} has no counterpart for Megatron tensor {name!r}")
    return [f"model.layers.{i}.{key}" for key in _layer_keys(rest, model, spec)]


def _split(name: str, t: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """The HF-side pieces of canonical tensor `t`, before any zero biases."""
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return list(qkv_to_hf(t, model))
    if name.endswith("linear_fc1.weight"):
        return list(t.chunk(2, dim=0))
    return [t]


def to_hf(name: str, t: torch.Tensor, model: ModelConfig, spec: HFSpec) -> Tensors:
    """The Hugging Face tensors that hold canonical tensor `name` (plus exact zero biases)."""
    keys = hf_keys(name, model, spec)
    parts = _split(name, t, model)
    # zero biases: one per output row of the piece they belong to (q, k, v; o_proj)
    parts += [p.new_zeros(p.shape[0]) for p in parts[: len(keys) - len(parts)]]
    return list(zip(keys, parts))


def from_hf(
    name: str, read: Callable[[str], torch.Tensor], model: ModelConfig, spec: HFSpec
) -> torch.Tensor:
    """Canonical tensor `name` assembled from the HF tensors `read(key)` returns."""
    keys = hf_keys(name, model, spec)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return qkv_from_hf(*(read(k) for k in keys[:3]), model)
    if name.endswith("self_attention.linear_proj.weight") and len(keys) == 2:
        if read(keys[1]).any():
            raise ValueError(f"{keys[1]} is non-zero; our attention has no output-projection bias")
    if name.endswith("linear_fc1.weight"):
        return torch.cat([read(keys[0]), read(keys[1])], dim=0)
    return read(keys[0])


def hf_shapes(model: ModelConfig, spec: HFSpec) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the export of `model` writes, with its shape, in order."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in canonical_shapes(model).items():
        for key, t in to_hf(name, torch.empty(shape, device="meta"), model, spec):
            out[key] = tuple(t.shape)
    return out
