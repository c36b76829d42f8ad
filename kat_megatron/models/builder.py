"""Build Megatron-Core `GPTModel`s from kat configs: used by `kat train` and `kat model info`.

`transformer_config(model, parallel, precision)` maps our `ModelConfig` onto Megatron-Core's
`TransformerConfig`; `build_model(...)` returns the model chunk(s) of this rank's pipeline stage.
Megatron-Core must have its model-parallel state initialised (see `kat_megatron.parallel`).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from kat_megatron.config.schema import ModelConfig, ParallelConfig
from kat_megatron.models.specs import decoder_block_spec, mtp_block_spec


@functools.lru_cache(maxsize=1)
def te_available() -> bool:
    """True when Transformer Engine for PyTorch imports and CUDA is usable."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means TE is unusable here
        return False
    return True


def resolve_backend(model: ModelConfig) -> str:
    """`te` or `local` for this machine; errors when TE or FP8 is asked for but impossible."""
    if model.backend == "te" and not te_available():
        raise ValueError(
            "model.backend=te but Transformer Engine with CUDA is not available here; "
            "install the `gpu` extra in a CUDA environment or set model.backend=local"
        )
    backend = model.backend
    if backend == "auto":
        backend = "te" if te_available() else "local"
    if model.fp8 is not None and backend != "te":
        raise ValueError(
            f"model.fp8={model.fp8} needs Transformer Engine and CUDA, which are not available "
            "here; remove model.fp8 (or run in the kat container on H100s)"
        )
    return backend


def resolve_dtype(precision: str) -> torch.dtype:
    """Parameter dtype for `training.precision` (`auto`: bf16 on CUDA, fp32 on CPU)."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Vocab padded to a multiple of make_vocab_size_divisible_by * tp, as Megatron-LM does."""
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-model.vocab_size // multiple) * multiple


def moe_layer_freq(model: ModelConfig) -> int | list[int]:
    """Megatron-Core's `moe_layer_freq`: a per-layer 0/1 list when some layers stay dense."""
    if not model.is_moe:
        return 1
    pattern = [
        1 if (i >= model.moe_first_k_dense and i % model.moe_layer_freq == 0) else 0
        for i in range(model.num_layers)
    ]
    return 1 if all(pattern) else pattern


def recompute_overrides(mode: str, model: ModelConfig) -> dict:
    """TransformerConfig fields for `training.recompute` (none, selective or full).

    Selective recompute covers the attention core, and the MoE expert activations where
    Megatron-Core supports it (grouped GEMM, i.e. the TE backend)."""
    if mode == "none":
        return {}
    if mode == "selective":
        moe_act = model.is_moe and resolve_backend(model) == "te"
        modules = ["core_attn", "moe_act"] if moe_act else ["core_attn"]
        return {"recompute_granularity": "selective", "recompute_modules": modules}
    if mode == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    raise ValueError(f"training.recompute={mode!r}: expected none, selective or full")


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, precision: str = "auto", **overrides
) -> TransformerConfig:
    """Megatron-Core TransformerConfig for `model` at layout `parallel`."""
    dtype = resolve_dtype(precision)
    backend = resolve_backend(model)
    kw = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        # Megatron-Core's fused SwiGLU (MLP, experts, shared experts): model.swiglu_fusion.
        bias_activation_fusion=model.swiglu_fused,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **parallel.mcore_sizes(),
        # Uneven pipeline stages; specs.decoder_block_spec follows them through Megatron-Core's
        # get_num_layers_to_build / get_transformer_layer_offset.
        num_layers_in_first_pipeline_stage=parallel.first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel.last_stage_layers,
        account_for_embedding_in_pipeline_split=parallel.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=parallel.account_for_loss_in_pipeline_split,
        sequence_parallel=parallel.sp,
        # Interleaved schedule: sends / receives behind the next chunk's compute (Megatron-Core
        # refuses it together with batched p2p ops).
        overlap_p2p_comm=parallel.p2p_overlap,
        batch_p2p_comm=not parallel.p2p_overlap,
        use_cpu_initialization=not torch.cuda.is_available(),
        deterministic_mode=not torch.cuda.is_available(),
        mtp_num_layers=model.mtp_num_layers or None,
        mtp_loss_scaling_factor=model.mtp_loss_scaling_factor,
    )
    if model.is_moe:
        kw.update(
            num_moe_experts=model.num_moe_experts,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size or model.ffn_hidden_size,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
            moe_layer_freq=moe_layer_freq(model),
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_router_load_balancing_type=model.moe_router_load_balancing_type,
            moe_token_dispatcher_type=model.moe_token_dispatcher_type,
            moe_router_dtype=model.moe_router_dtype,
            moe_grouped_gemm=backend == "te",
            moe_permute_fusion=False,
        )
    if model.fp8 is not None:
        kw.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe, fp8_param=model.fp8_param)
    kw.update(overrides)
    if model.is_moe and kw.get("calculate_per_token_loss") and parallel.sp:
        # Megatron-Core 0.16.1 (moe/router.py) scales the per-token aux loss by the *local*
        # token count, which under sequence (and context) parallelism is 1/(tp*cp) of the
        # micro-batch that finalize_model_grads divides by: the load-balancing gradient would
        # shrink with the layout. Compensate so the coefficient means the same at any TP/CP
        # (tests/training/test_parity_moe.py checks tiny-moe TP=2 against TP=1).
        kw["moe_aux_loss_coeff"] = model.moe_aux_loss_coeff * parallel.tp * parallel.cp
    return TransformerConfig(**kw)


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: str = "auto",
    config: TransformerConfig | None = None,
) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), on CPU or the current GPU."""
    config = config or transformer_config(model, parallel, precision)
    use_te = resolve_backend(model) == "te"
    vocab = padded_vocab_size(model, parallel.tp)
    vpp = parallel.vpp or 1
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if parallel.vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        block = decoder_block_spec(config, use_te, vp_stage=vp_stage, attention=model.attention)
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=vocab,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=int(model.rotary_base),
            mtp_block_spec=mtp_block_spec(
                config, block, use_te, vp_stage=vp_stage, attention=model.attention
            ),
            vp_stage=vp_stage,
        )
        if torch.cuda.is_available():
            gpt.cuda(torch.cuda.current_device())
        chunks.append(gpt)
    return chunks
