"""config.json <-> `ModelConfig`: `kat convert hf-to-mcore --hf DIR ...` and `mcore-to-hf`.

Qwen2ForCausalLM is our dense architecture exactly (QKV bias, RMSNorm, SwiGLU, RoPE, GQA).
Qwen3MoeForCausalLM maps onto our MoE with `qk_layernorm=true`; its `attention_bias` puts a bias
on q, k, v *and* o_proj, so our QKV bias exports with a zero o_proj bias (exact) and an import
refuses a non-zero one. Megatron's default router (top-k on logits, softmax over the k) equals
Qwen3-MoE's softmax-then-renormalise, i.e. `norm_topk_prob: true`; false is refused. Anything
else the mapping cannot reproduce exactly (sliding windows, RoPE scaling, other activations)
is a one-line error naming the field. MTP heads travel in the export's `mtp/` subfolder
(`checkpoint/hf_mtp.py`); config.json itself stays the stock architecture's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kat_megatron.checkpoint.hf_mtp import read_mtp_config
from kat_megatron.config.schema import ModelConfig

QWEN2 = "Qwen2ForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
ARCHITECTURES = (QWEN2, QWEN3_MOE)


@dataclass(frozen=True)
class HFSpec:
    """What the tensor mapping needs to know about the Hugging Face side."""

    arch: str
    """One of ARCHITECTURES."""
    qkv_bias: bool
    """q/k/v projections carry a bias in the HF model (always for Qwen2)."""
    o_bias: bool
    """o_proj carries a bias (Qwen3-MoE `attention_bias`); ours has none, so it is zero."""


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The raw config.json of a Hugging Face model folder."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    return json.loads(path.read_text())


def architecture(raw: dict[str, Any], where: str = "config.json") -> str:
    """The single supported architecture named in `raw`, or a ValueError listing the supported."""
    archs = raw.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(
            f"{where}: unsupported architecture {archs}; kat convert supports {list(ARCHITECTURES)}"
        )
    return archs[0]


def _rope_theta(cfg: Any, where: str) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"{where}: rope_type={kind!r} is not supported (only default RoPE)")
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _common_fields(cfg: Any, where: str) -> dict[str, Any]:
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={cfg.hidden_act!r} is not supported (only silu)")
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return dict(
        preset=None,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=heads,
        num_query_groups=cfg.num_key_value_heads or heads,
        kv_channels=None if head_dim * heads == cfg.hidden_size else head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rotary_base=_rope_theta(cfg, where),
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        normalization="RMSNorm",
        norm_epsilon=cfg.rms_norm_eps,
        activation="swiglu",
        init_method_std=cfg.initializer_range,
    )


def _moe_fields(cfg: Any, where: str) -> dict[str, Any]:
    if not cfg.norm_topk_prob:
        raise ValueError(
            f"{where}: norm_topk_prob=false is not supported (our router renormalises the top-k)"
        )
    if cfg.decoder_sparse_step != 1:
        raise ValueError(f"{where}: decoder_sparse_step={cfg.decoder_sparse_step} (only 1)")
    dense = sorted(cfg.mlp_only_layers or [])
    if dense != list(range(len(dense))):
        raise ValueError(
            f"{where}: mlp_only_layers={dense} is not supported (only the first k layers dense)"
        )
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=None,
        moe_first_k_dense=len(dense),
        moe_aux_loss_coeff=cfg.router_aux_loss_coef,
        qk_layernorm=True,
        add_qkv_bias=bool(cfg.attention_bias),
    )


def model_config_from_hf(hf_dir: str | Path) -> tuple[ModelConfig, HFSpec, torch.dtype]:
    """(our ModelConfig, the HF-side spec, the checkpoint dtype) of a Hugging Face folder."""
    from transformers import AutoConfig

    where = f"{hf_dir}/config.json"
    arch = architecture(read_hf_config(hf_dir), where)
    cfg = AutoConfig.from_pretrained(hf_dir)
    fields = _common_fields(cfg, where)
    if arch == QWEN2:
        fields.update(add_qkv_bias=True, qk_layernorm=False)
        spec = HFSpec(arch, qkv_bias=True, o_bias=False)
    else:
        fields.update(_moe_fields(cfg, where))
        spec = HFSpec(arch, qkv_bias=fields["add_qkv_bias"], o_bias=fields["add_qkv_bias"])
    mtp = read_mtp_config(hf_dir)
    if mtp is not None:
        fields["mtp_num_layers"] = mtp["num_nextn_predict_layers"]
        if mtp.get("mtp_loss_scaling_factor") is not None:
            fields["mtp_loss_scaling_factor"] = float(mtp["mtp_loss_scaling_factor"])
    dtype = getattr(cfg, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return ModelConfig(**fields), spec, dtype


def default_architecture(model: ModelConfig) -> str:
    return QWEN3_MOE if model.is_moe else QWEN2


def hf_spec_for(model: ModelConfig, arch: str | None = None) -> HFSpec:
    """The HF-side spec `model` exports to, or a ValueError saying why it cannot be exact."""
    arch = arch or default_architecture(model)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; choose from {list(ARCHITECTURES)}")
    if model.activation != "swiglu" or model.normalization != "RMSNorm":
        raise ValueError(f"{arch} needs activation=swiglu and normalization=RMSNorm")
    if arch == QWEN2:
        if model.is_moe or model.qk_layernorm:
            raise ValueError("Qwen2ForCausalLM is dense without qk-norm; this model is not")
        return HFSpec(arch, qkv_bias=True, o_bias=False)
    if not model.is_moe:
        raise ValueError("Qwen3MoeForCausalLM needs an MoE model (model.num_moe_experts)")
    if not model.qk_layernorm:
        raise ValueError(
            "Qwen3MoeForCausalLM always applies qk-norm (q_norm/k_norm) and no weight makes it "
            "the identity: export needs a model trained with model.qk_layernorm=true "
            "(see docs/conversion.md)"
        )
    if model.moe_shared_expert_intermediate_size or model.moe_layer_freq != 1:
        raise ValueError(
            "Qwen3MoeForCausalLM has no shared expert and needs moe_layer_freq=1 "
            "(dense layers only as moe_first_k_dense)"
        )
    return HFSpec(arch, qkv_bias=model.add_qkv_bias, o_bias=model.add_qkv_bias)


def hf_config_for(
    model: ModelConfig, spec: HFSpec, dtype: torch.dtype, token_ids: dict[str, Any] | None = None
):
    """A transformers config object for `model` exported as `spec.arch` in `dtype`."""
    from transformers import Qwen2Config, Qwen3MoeConfig

    kw = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        hidden_act="silu",
        max_position_embeddings=model.max_position_embeddings,
        initializer_range=model.init_method_std,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
        **(token_ids or {}),
    )
    if spec.arch == QWEN2:
        cfg = Qwen2Config(**kw)
    else:
        cfg = Qwen3MoeConfig(
            **kw,
            head_dim=model.head_dim,
            attention_bias=spec.o_bias,
            num_experts=model.num_moe_experts,
            num_experts_per_tok=model.moe_router_topk,
            moe_intermediate_size=model.moe_ffn_hidden_size or model.ffn_hidden_size,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(model.moe_first_k_dense)),
            router_aux_loss_coef=model.moe_aux_loss_coeff,
        )
    if model.head_dim * model.num_attention_heads != model.hidden_size:
        cfg.head_dim = model.head_dim
    cfg.architectures = [spec.arch]
    cfg.dtype = dtype
    return cfg
