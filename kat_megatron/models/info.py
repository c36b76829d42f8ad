"""`kat model info PRESET|config.yaml`: the shape and parameter counts of a model, without torch.

`resolve_model(arg)` turns a preset name or a run-config path into a `ModelConfig`;
`model_info(arg)` returns the printable report (shape, then `ParamCount.table()`).
"""

from __future__ import annotations

import os

from kat_megatron.config.presets import PRESETS, get_preset
from kat_megatron.config.schema import ModelConfig
from kat_megatron.models.params import count_params


def _is_config_path(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml")) or os.path.isfile(arg)


def resolve_model(preset_or_config_path: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, display name) for a preset name or a YAML run-config path."""
    arg = preset_or_config_path
    if arg in PRESETS:
        return ModelConfig(**get_preset(arg)), arg
    if _is_config_path(arg):
        if not os.path.isfile(arg):
            raise ValueError(f"config file not found: {arg}")
        from kat_megatron.config import load_config

        return load_config(arg).model, arg
    raise ValueError(
        f"{arg!r} is neither a model preset nor a config file; known presets: {sorted(PRESETS)}"
    )


def shape_lines(model: ModelConfig) -> list[str]:
    """One-line-per-aspect description of the architecture."""
    lines = [
        f"layers {model.num_layers}, hidden {model.hidden_size}, "
        f"heads {model.num_attention_heads} (KV groups {model.num_query_groups}, "
        f"head dim {model.head_dim}), QKV bias {'on' if model.add_qkv_bias else 'off'}, "
        f"qk-norm {'on' if model.qk_layernorm else 'off'}",
        f"vocab {model.vocab_size:,}, embeddings "
        f"{'untied' if model.untie_embeddings_and_output_weights else 'tied'}, "
        f"{model.normalization}, {model.activation}, max positions {model.max_position_embeddings:,}",
    ]
    if model.is_moe:
        shared = model.moe_shared_expert_intermediate_size
        lines.append(
            f"MoE: {model.num_moe_experts} experts, top-{model.moe_router_topk}, expert FFN "
            f"{model.moe_ffn_hidden_size or model.ffn_hidden_size}, shared expert "
            f"{shared if shared else 'none'}, first {model.moe_first_k_dense} layer(s) dense "
            f"(dense FFN {model.ffn_hidden_size}), every {model.moe_layer_freq} layer(s) MoE"
        )
    else:
        lines.append(f"dense FFN {model.ffn_hidden_size}")
    if model.mtp_num_layers:
        lines.append(f"MTP: {model.mtp_num_layers} depth(s)")
    return lines


def model_info(preset_or_config_path: str) -> str:
    """Printable report: architecture, then total and active parameters per component."""
    model, name = resolve_model(preset_or_config_path)
    counts = count_params(model, name=name)
    lines = [f"Model {name}" + (f" (preset {model.preset})" if model.preset != name else "")]
    lines += ["  " + line for line in shape_lines(model)]
    lines.append("")
    lines.append(counts.table())
    return "\n".join(lines)
