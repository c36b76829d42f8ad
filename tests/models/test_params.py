"""Parameter counts: the analytic formula (kat_megatron.models.params) against independent
formulas written here and against real Megatron-Core GPTModels built on the meta device."""

from __future__ import annotations

import time

import pytest
import torch

from kat_megatron.config.presets import get_preset
from kat_megatron.config.schema import ModelConfig, ParallelConfig
from kat_megatron.models.info import model_info
from kat_megatron.models.params import COMPONENTS, count_module_params, count_params


def _model(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**dict(get_preset(name), **overrides))


def _dense_total(L, h, nq, nkv, ffn, V):
    """Qwen2-style dense model: QKV bias, SwiGLU, RMSNorm, untied embeddings."""
    d = h // nq
    qkv = h * (nq + 2 * nkv) * d + (nq + 2 * nkv) * d
    proj = nq * d * h
    mlp = 3 * h * ffn
    norms = 2 * h
    return L * (qkv + proj + mlp + norms) + 2 * V * h + h


def test_kat_v1_40b_total_matches_independent_formula():
    expected = _dense_total(L=80, h=5120, nq=40, nkv=8, ffn=27648, V=152064)
    counts = count_params(_model("kat-v1-40b"))
    assert counts.total == expected
    assert counts.active == expected  # dense: every parameter is active
    assert abs(expected / 40.6e9 - 1) < 0.01
    assert counts.padded_vocab_size == counts.vocab_size == 152064


def test_kat_200b_a40b_design():
    m = _model("kat-200b-a40b")
    counts = count_params(m)
    assert abs(counts.total / 200e9 - 1) < 0.03
    assert abs(counts.active / 40e9 - 1) < 0.03
    # Independent formula: every layer MoE, no shared expert, top-k of E SwiGLU experts;
    # Qwen3-MoE attention: no QKV bias, one RMSNorm of width d on queries and one on keys.
    L, h, nq, nkv, V = 96, 8192, 64, 8, 152064
    E, k, fe, d = 64, 8, 1216, 128
    attn = h * (nq + 2 * nkv) * d + 2 * d + nq * d * h + 2 * h + E * h
    base = 2 * V * h + h + L * attn
    assert counts.total == base + L * E * 3 * h * fe
    assert counts.active == base + L * k * 3 * h * fe
    # Layout constraints of the design.
    assert all(m.num_moe_experts % ep == 0 for ep in (1, 2, 4, 8, 16, 32, 64))
    assert m.num_moe_experts in (64, 128, 256)
    assert m.hidden_size % 8 == 0 and m.num_attention_heads % 8 == 0
    assert m.num_query_groups == 8 and m.num_layers % 8 == 0 and m.num_layers % 4 == 0
    assert m.vocab_size == 152064 and m.mtp_num_layers is None
    # Stock Qwen3-MoE: no shared expert, no dense layers, qk-norm, no QKV bias.
    assert m.moe_shared_expert_intermediate_size is None and m.moe_first_k_dense == 0
    assert m.qk_layernorm and not m.add_qkv_bias
    assert counts.num_moe_layers == m.num_layers


def test_mtp_adds_norms_projection_and_a_layer():
    base = count_params(_model("kat-200b-a40b"))
    mtp = count_params(_model("kat-200b-a40b", mtp_num_layers=1))
    h = 8192
    assert mtp.total_without_mtp == base.total
    assert mtp.components["mtp"] == 3 * h + 2 * h * h + base.per_layer["moe_layer"]
    assert mtp.active == base.active


def test_table_and_model_info(tmp_path):
    table = count_params(_model("tiny-moe", mtp_num_layers=1)).table()
    for word in ("moe_routed_experts", "moe_shared_expert", "mtp", "total without MTP"):
        assert word in table
    assert "200.65B" in model_info("kat-200b-a40b") and "qk-norm on" in model_info("kat-200b-a40b")
    assert "40.57B" in model_info("kat-v1-40b")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  preset: tiny-moe\n  mtp_num_layers: 1\n")
    # the config's total as count_params gives it (checked against Megatron-Core's own modules
    # by test_meta_model_matches_formula below)
    total = count_params(_model("tiny-moe", mtp_num_layers=1)).total
    assert f"{total:,}" in model_info(str(cfg))
    with pytest.raises(ValueError, match="known presets"):
        model_info("no-such-model")


@pytest.fixture(scope="module")
def megatron_world():
    """A one-rank gloo world with Megatron-Core's model-parallel state (CPU adaptation applied)."""
    from kat_megatron.parallel.init import initialize, shutdown

    initialize(ParallelConfig(), seed=0)
    yield
    shutdown()


CASES = {
    "tiny-dense": ("tiny-dense", {}),
    "tiny-dense-tied-layernorm-gelu": (
        "tiny-dense",
        dict(
            untie_embeddings_and_output_weights=False, normalization="LayerNorm", activation="gelu"
        ),
    ),
    "tiny-dense-qk-norm": ("tiny-dense", dict(qk_layernorm=True, add_qkv_bias=False)),
    "tiny-moe": ("tiny-moe", {}),
    "tiny-moe-mtp1": ("tiny-moe", dict(mtp_num_layers=1)),
    "tiny-moe-mixed-mtp2": (
        "tiny-moe",
        dict(
            moe_first_k_dense=1,
            moe_layer_freq=2,
            moe_shared_expert_intermediate_size=None,
            mtp_num_layers=2,
            vocab_size=500,
        ),
    ),
    "kat-v1-40b": ("kat-v1-40b", {}),
    "kat-200b-a40b": ("kat-200b-a40b", {}),
    "kat-200b-a40b-mtp1": ("kat-200b-a40b", dict(mtp_num_layers=1)),
    "tiny-qwen3-moe": ("tiny-qwen3-moe", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_meta_model_matches_formula(megatron_world, case):
    from kat_megatron.models.builder import build_model, transformer_config

    name, overrides = CASES[case]
    model, par = _model(name, **overrides), ParallelConfig()
    config = transformer_config(model, par, perform_initialization=False)
    start = time.monotonic()
    with torch.device("meta"):
        chunks = build_model(model, par, config=config)
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"building {case} on meta took {elapsed:.1f}s"
    tensors = [t for c in chunks for t in (*c.parameters(), *c.buffers())]
    assert {t.device.type for t in tensors} == {"meta"}, "meta build allocated real tensors"
    got = count_module_params(chunks)
    expected = count_params(model)
    assert {k: got[k] for k in COMPONENTS} == expected.components
    assert got["total"] == expected.total
