"""What `model.fp8` changes in `kat plan`'s memory: `pytest tests/planning/test_fp8.py`.

Each term is checked against its formula written out again (docs/scaling.md, "FP8"): Transformer
Engine's FP8 linear layers save a 1-byte copy of their input instead of the bf16 tensor (QKV,
FC1, FC2, experts), linear_proj adds one beside the bf16 attention output that fused attention
keeps anyway, and every FP8 weight has an FP8 copy and an FP8 transpose cached for the step.
"""

from __future__ import annotations

import dataclasses

import pytest

from kat_megatron.config.presets import get_preset
from kat_megatron.config.schema import ModelConfig
from kat_megatron.planning.activations import ActivationOptions, layer_terms
from kat_megatron.planning.layout import Layout
from kat_megatron.planning.static import static_memory

OPTS = ActivationOptions(seq_len=4096, micro_batch=2, backend="te")


def _pair(name: str) -> tuple[ModelConfig, ModelConfig]:
    bf16 = ModelConfig(**{**get_preset(name), "backend": "te"})
    return bf16, dataclasses.replace(bf16, fp8="hybrid", fp8_recipe="tensorwise")


def test_dense_layer_saves_fp8_linear_inputs():
    bf16, fp8 = _pair("tiny-dense")
    lay = Layout(tp=2, dp=1)
    t = OPTS.micro_batch * OPTS.seq_len
    t_sp, h, f = t / 2, bf16.hidden_size, bf16.ffn_hidden_size / 2
    a, d = bf16.num_attention_heads / 2, bf16.head_dim
    base, got = layer_terms(bf16, lay, OPTS, False), layer_terms(fp8, lay, OPTS, False)
    assert base["linear_inputs"] == 2 * t_sp * h * 2 and got["linear_inputs"] == 2 * t_sp * h
    assert got["proj_input_fp8"] == t * a * d  # beside the bf16 output attention keeps
    assert base["mlp"] == 3 * t * f * 2  # fused SwiGLU: FC1 output (2f) + FC2 input (f)
    assert got["mlp"] == t * f * (2 * 2 + 1)  # FC2 keeps its input in FP8
    unchanged = set(base) - {"linear_inputs", "mlp"}
    assert all(got[k] == base[k] for k in unchanged)


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_moe_layer_saves_fp8_expert_inputs(recompute):
    bf16, fp8 = _pair("tiny-moe")
    lay, opts = Layout(tp=1, ep=2, dp=2), dataclasses.replace(OPTS, recompute=recompute)
    t, h = OPTS.micro_batch * OPTS.seq_len, bf16.hidden_size
    n = t * bf16.moe_router_topk  # routed tokens (EP2 > 1, but load factor 1)
    fe, fs = bf16.moe_ffn_hidden_size, bf16.moe_shared_expert_intermediate_size
    got = layer_terms(fp8, lay, opts, True)
    assert got["linear_inputs"] == t * h * (1 + 2)  # QKV in FP8, the router's input in bf16
    # input in FP8, probabilities fp32, FC1 output bf16 (kept by moe_act recompute too) and
    # FC2's FP8 input, which recompute cannot drop (it is FC2's own tensor)
    assert got["experts"] == n * (h + 4) + n * fe * (2 * 2 + 1)
    assert got["shared_expert"] == t * fs * (2 * 2 + 1) + t * h  # + its FC1's FP8 input copy


def test_fp8_weight_copies_are_static():
    """2 bytes per element of every FP8 linear weight (QKV, proj, FC1, FC2), nothing else."""
    bf16, fp8 = _pair("tiny-dense")
    lay = Layout(tp=2, dp=1)
    h, d, tp = bf16.hidden_size, bf16.head_dim, 2
    qkv = (bf16.num_attention_heads + 2 * bf16.num_query_groups) * d * h / tp
    proj = bf16.num_attention_heads * d * h / tp
    mlp = 3 * bf16.ffn_hidden_size * h / tp  # SwiGLU FC1 (2f) and FC2 (f)
    base, got = static_memory(bf16, lay, 0), static_memory(fp8, lay, 0)
    assert base.fp8_weight_bytes == 0
    assert got.fp8_weight_bytes == 2 * bf16.num_layers * (qkv + proj + mlp)
    assert got.total_bytes - base.total_bytes == got.fp8_weight_bytes


def test_fp8_primary_weights_replace_the_bf16_copy():
    """`model.fp8_param`: each FP8 linear weight is 1 byte (the parameter is the FP8 data) plus
    its cached FP8 transpose (1 byte), instead of bf16 (2) + FP8 data and transpose (2); the
    gradient, main copy and moments are unchanged."""
    bf16, fp8 = _pair("tiny-dense")
    prim = dataclasses.replace(fp8, fp8_param=True)
    lay = Layout(tp=2, dp=2)
    h, d, tp = bf16.hidden_size, bf16.head_dim, 2
    n = bf16.num_layers * (
        (bf16.num_attention_heads + 2 * bf16.num_query_groups) * d * h / tp
        + bf16.num_attention_heads * d * h / tp
        + 3 * bf16.ffn_hidden_size * h / tp
    )
    a, b = static_memory(fp8, lay, 0), static_memory(prim, lay, 0)
    assert b.fp8_weight_bytes == n
    assert a.params_bytes - b.params_bytes == n  # 2 bytes -> 1 per FP8 element
    assert a.total_bytes - b.total_bytes == 2 * n
    for f in ("grad_bytes", "main_param_bytes", "moment_bytes", "numel"):
        assert getattr(a, f) == getattr(b, f), f


def test_fp8_param_needs_fp8_and_the_distributed_optimizer():
    from kat_megatron.config.schema import KatConfig, ParallelConfig

    bf16, _ = _pair("tiny-dense")
    with pytest.raises(ValueError, match="model.fp8_param=true .* needs FP8 training"):
        dataclasses.replace(bf16, fp8_param=True)
    prim = dataclasses.replace(bf16, fp8="hybrid", fp8_param=True)
    with pytest.raises(ValueError, match="needs parallel.use_distributed_optimizer=true"):
        KatConfig(model=prim, parallel=ParallelConfig(use_distributed_optimizer=False))
