"""Layer specs for kat models: `kat train cfg.yaml model.backend=te|local model.attention=sdpa`.

Megatron-Core's `BackendSpecProvider` is the extension point. On GPUs with Transformer Engine we
use Megatron-Core's TE provider unchanged. Without TE we use `KatLocalSpecProvider`: Megatron-Core's
local (torch) layers, except that the norm is a torch norm that supports sequence parallelism
(Megatron-Core's `WrappedTorchNorm` refuses it, yet MoE with TP>1 requires it), and the core
attention is `model.attention`: `sdpa` (`models/attention.py`, torch's fused SDPA kernels) or
`unfused` (Megatron-Core's `DotProductAttention`, the reference).
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_mtp_block_spec_for_backend,
    get_mlp_module_spec_for_backend,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from kat_megatron.models.attention import SDPAttention

CORE_ATTENTION = {"sdpa": SDPAttention, "unfused": DotProductAttention}
"""`model.attention` -> the local backend's core attention module."""


class KatTorchNorm:
    """RMSNorm/LayerNorm from torch with Megatron's constructor and sequence-parallel marking.

    With sequence parallelism each TP rank normalises its own slice of the sequence, so the norm
    weights' gradients are partial sums; marking the parameters `sequence_parallel` makes
    Megatron-Core's `finalize_model_grads` all-reduce them over the TP group, as it does for TE.
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma needs Transformer Engine (model.backend=te)")
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


class KatLocalSpecProvider(LocalSpecProvider):
    """Megatron-Core's local provider with a sequence-parallel-capable torch norm and the core
    attention named by `attention` (`CORE_ATTENTION`)."""

    def __init__(self, attention: str = "sdpa") -> None:
        super().__init__()
        if attention not in CORE_ATTENTION:
            raise ValueError(f"model.attention={attention!r}: expected one of "
                             f"{list(CORE_ATTENTION)}")  # fmt: skip
        self.attention = attention

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return KatTorchNorm

    def core_attention(self) -> type:
        return CORE_ATTENTION[self.attention]


def _local_layer_spec(
    num_experts: int | None, qk_layernorm: bool = False, attention: str = "sdpa"
) -> ModuleSpec:
    """A transformer layer of local modules (the shape of Megatron-Core's local GPT layer)."""
    backend = KatLocalSpecProvider(attention)
    norm = backend.layer_norm(rms_norm=True)
    qk_norm = backend.layer_norm(rms_norm=True, for_qk=True) if qk_layernorm else IdentityOp
    mlp = get_mlp_module_spec_for_backend(backend=backend, num_experts=num_experts)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            # Checkpoint keys as the TE spec names them (its norms are fused into the next
            # linear; an MoE layer's pre-MLP norm stays separate), so checkpoints move between
            # CPU (local) and GPU (TE) runs.
            sharded_state_dict_keys_map=(
                {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
                if num_experts
                else {
                    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
                }
            ),
        ),
    )


def moe_layer_pattern(config: TransformerConfig) -> list[int]:
    """1 for MoE layers, 0 for dense ones (from Megatron-Core's `moe_layer_freq`)."""
    freq = config.moe_layer_freq
    if isinstance(freq, list):
        return list(freq)
    return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]


def decoder_block_spec(
    config: TransformerConfig,
    use_te: bool,
    vp_stage: int | None = None,
    attention: str = "sdpa",
) -> TransformerBlockSubmodules:
    """The decoder block spec for this pipeline stage (and virtual stage); `attention` is the
    local backend's core attention (`model.attention`; TE picks its own)."""
    if use_te:
        return get_gpt_decoder_block_spec(
            config,
            use_transformer_engine=True,
            normalization=config.normalization,
            vp_stage=vp_stage,
        )
    qk = config.qk_layernorm
    dense = _local_layer_spec(None, qk, attention)
    experts = config.num_moe_experts
    moe = _local_layer_spec(experts, qk, attention) if experts else None
    specs = (
        [moe if p else dense for p in moe_layer_pattern(config)]
        if moe
        else [dense] * (config.num_layers)
    )
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset : offset + n], layer_norm=KatTorchNorm
    )


def mtp_block_spec(
    config: TransformerConfig,
    block: TransformerBlockSubmodules,
    use_te: bool,
    vp_stage: int | None = None,
    attention: str = "sdpa",
):
    """MTP block spec (None when this stage builds no MTP layer or MTP is off)."""
    if not config.mtp_num_layers:
        return None
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
    else:
        backend = KatLocalSpecProvider(attention)
    # The MTP layer copies the decoder's last layer spec; use a full-model one so that a stage
    # without decoder layers still has a spec to copy.
    qk = config.qk_layernorm
    last = _local_layer_spec(None, qk, attention) if not use_te else block.layer_specs[-1]
    if not use_te and config.num_moe_experts and moe_layer_pattern(config)[-1]:
        last = _local_layer_spec(config.num_moe_experts, qk, attention)
    return get_gpt_mtp_block_spec_for_backend(
        config=config, spec=last, backend=backend, vp_stage=vp_stage
    )
