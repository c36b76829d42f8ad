"""Model presets: `kat model info PRESET` prints their sizes; configs select one with `model.preset`
(the loader, `config/loader.py`, merges it under the fields given beside it).

A preset is a dict of `ModelConfig` field values. `kat-v1-40b` is the released KAT-V1-40B
(Qwen2 architecture); `kat-200b-a40b` is this project's MoE design (see docs/scaling.md);
`tiny-*` are for tests and demos on CPU.
"""

from __future__ import annotations

from typing import Any

_QWEN2 = dict(
    normalization="RMSNorm",
    norm_epsilon=1e-6,
    activation="swiglu",
    add_qkv_bias=True,
    untie_embeddings_and_output_weights=True,
    rotary_base=1_000_000.0,
    make_vocab_size_divisible_by=128,
)

PRESETS: dict[str, dict[str, Any]] = {
    "kat-v1-40b": dict(
        _QWEN2,
        num_layers=80,
        hidden_size=5120,
        num_attention_heads=40,
        num_query_groups=8,
        ffn_hidden_size=27648,
        vocab_size=152064,
        max_position_embeddings=131072,
    ),
    # MoE design (docs/scaling.md): 200.65B total, 39.99B active per token (formula in
    # kat_megatron/models/params.py). Stock Qwen3-MoE structure, so that it exports to HF
    # Qwen3MoeForCausalLM exactly (and serves in vLLM): every layer MoE, 64 fine-grained experts
    # (EP 1..64), top-8 renormalised, no shared expert, qk-norm and no QKV bias. ffn_hidden_size
    # is unused while moe_first_k_dense=0 (the routed width 8 x 1216 for dense layers if enabled).
    "kat-200b-a40b": dict(
        _QWEN2,
        num_layers=96,
        hidden_size=8192,
        num_attention_heads=64,
        num_query_groups=8,
        ffn_hidden_size=9728,
        vocab_size=152064,
        max_position_embeddings=131072,
        num_moe_experts=64,
        moe_router_topk=8,
        moe_ffn_hidden_size=1216,
        moe_shared_expert_intermediate_size=None,
        moe_first_k_dense=0,
        moe_aux_loss_coeff=1e-3,
        moe_router_load_balancing_type="aux_loss",
        add_qkv_bias=False,
        qk_layernorm=True,
    ),
    # tiny-*: 32-wide heads (2 heads, 2 KV groups: TP=2 splits both), the narrowest vLLM's CPU
    # attention kernels accept, so an export of a tiny model serves in vLLM too.
    "tiny-dense": dict(
        _QWEN2,
        num_layers=4,
        hidden_size=64,
        num_attention_heads=2,
        num_query_groups=2,
        ffn_hidden_size=128,
        vocab_size=512,
        max_position_embeddings=4096,
    ),
}
PRESETS["tiny-moe"] = dict(
    PRESETS["tiny-dense"],  # the same trunk, every layer MoE
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=64,
    moe_shared_expert_intermediate_size=64,
    moe_first_k_dense=0,
)

# kat-200b-a40b's structure at test size (every structural field inherited, only the sizes
# differ): what its Qwen3-MoE export is tested on (tests/checkpoint/test_convert.py). 4 heads
# of 32 in 2 KV groups (GQA, q width 128 != hidden 64), 8 experts top-2 (EP=2: 4 per rank).
PRESETS["tiny-qwen3-moe"] = dict(
    PRESETS["kat-200b-a40b"],
    num_layers=3,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=32,
    ffn_hidden_size=64,
    vocab_size=512,
    max_position_embeddings=4096,
    num_moe_experts=8,
    moe_router_topk=2,
    moe_ffn_hidden_size=32,
)


def get_preset(name: str) -> dict[str, Any]:
    """Return a copy of preset `name`'s ModelConfig fields; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return dict(PRESETS[name], preset=name)
