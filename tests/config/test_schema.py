"""Validation in kat_megatron.config.schema: every layout check says what is wrong in one line."""

from __future__ import annotations

import pytest

from kat_megatron.config import (
    DataConfig,
    KatConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
    check_layout,
)


def _moe(**kw) -> ModelConfig:
    return ModelConfig(num_moe_experts=4, moe_router_topk=2, **kw)


def _layout_error(model: ModelConfig, par: ParallelConfig, world_size: int | None = None) -> str:
    with pytest.raises(ValueError) as info:
        check_layout(model, par, world_size)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_valid_layouts_pass():
    check_layout(ModelConfig(), ParallelConfig(tp=2, pp=2), world_size=8)
    check_layout(_moe(), ParallelConfig(tp=2, ep=2), world_size=4)
    check_layout(_moe(), ParallelConfig(ep=4, cp=2), world_size=4)  # ep divides dp*cp = 4


def test_tp_must_divide_attention_heads():
    msg = _layout_error(
        ModelConfig(num_attention_heads=4, num_query_groups=2), ParallelConfig(tp=3)
    )
    assert msg == (
        "parallel.tp=3 does not divide model.num_attention_heads=4; choose tp from [1, 2, 4]"
    )


def test_tp_must_divide_kv_groups():
    msg = _layout_error(
        ModelConfig(num_attention_heads=4, num_query_groups=2), ParallelConfig(tp=4)
    )
    assert "parallel.tp=4 does not divide model.num_query_groups=2 (KV groups)" in msg
    assert "choose tp from [1, 2]" in msg


def test_tp_must_divide_ffn_hidden_size():
    model = ModelConfig(num_attention_heads=4, num_query_groups=4, ffn_hidden_size=130)
    msg = _layout_error(model, ParallelConfig(tp=4))
    assert msg == "parallel.tp=4 does not divide model.ffn_hidden_size=130"


def test_pp_must_divide_layers():
    msg = _layout_error(ModelConfig(num_layers=4), ParallelConfig(pp=3))
    assert msg == "parallel.pp=3 does not divide model.num_layers=4; choose pp from [1, 2, 4]"


def test_pp_times_vpp_must_divide_layers():
    msg = _layout_error(ModelConfig(num_layers=4), ParallelConfig(pp=2, vpp=4))
    assert msg.startswith("parallel.pp=2 x parallel.vpp=4 does not divide model.num_layers=4")


def test_ep_on_dense_model():
    msg = _layout_error(ModelConfig(), ParallelConfig(ep=2))
    assert msg == "parallel.ep=2 needs an MoE model (model.num_moe_experts is unset)"


def test_ep_must_divide_experts():
    msg = _layout_error(_moe(), ParallelConfig(ep=3))
    assert msg == "parallel.ep=3 does not divide model.num_moe_experts=4; choose ep from [1, 2, 4]"


def test_moe_with_tp_needs_sequence_parallel():
    msg = _layout_error(_moe(), ParallelConfig(tp=2, sequence_parallel=False))
    assert msg == "MoE with parallel.tp > 1 needs parallel.sequence_parallel=true"
    check_layout(_moe(), ParallelConfig(tp=2))  # sequence_parallel=None means on with tp > 1


def test_world_size_must_be_divisible_by_model_parallel_size():
    msg = _layout_error(ModelConfig(), ParallelConfig(tp=2, pp=2), world_size=6)
    assert msg == (
        "world size 6 is not divisible by tp*pp*cp=4 (parallel.tp=2, parallel.pp=2, parallel.cp=1)"
        "; start a multiple of 4 ranks (e.g. --nproc 4) or shrink the layout"
    )


def test_ep_must_divide_dp_times_cp():
    msg = _layout_error(_moe(), ParallelConfig(ep=4), world_size=2)
    assert msg.startswith("parallel.ep=4 must divide data-parallel x context-parallel size 2")
    assert "world size 2" in msg


def test_kat_config_runs_layout_checks():
    with pytest.raises(ValueError, match=r"parallel.tp=3 does not divide model.num_attention"):
        KatConfig(parallel=ParallelConfig(tp=3))


def test_fp8_needs_transformer_engine_backend():
    with pytest.raises(ValueError) as info:
        ModelConfig(fp8="hybrid", backend="local")
    assert str(info.value) == "model.fp8 needs Transformer Engine: set model.backend=te (or auto)"
    ModelConfig(fp8="hybrid", backend="te")


def test_section_checks_name_the_key():
    with pytest.raises(ValueError, match=r"^model.num_query_groups=3 must divide"):
        ModelConfig(num_attention_heads=4, num_query_groups=3)
    with pytest.raises(ValueError, match=r"^model.activation='relu': expected one of"):
        ModelConfig(activation="relu")
    with pytest.raises(ValueError, match=r"^parallel.vpp needs parallel.pp > 1"):
        ParallelConfig(vpp=2)
    with pytest.raises(ValueError, match=r"^parallel.sequence_parallel=true needs parallel.tp > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ValueError, match=r"^optimizer.min_lr=0.1: expected in \[0, optimizer.lr\]"):
        OptimizerConfig(lr=0.01, min_lr=0.1)
    with pytest.raises(ValueError, match=r"global_batch_size=5 is not a multiple of"):
        TrainingConfig(global_batch_size=5, micro_batch_size=2)
    with pytest.raises(ValueError, match=r"^data.split='98,2': expected three numbers"):
        DataConfig(split="98,2")
    with pytest.raises(ValueError, match=r"^data.paths: a blend lists weight, prefix pairs"):
        DataConfig(paths=[0.5, "a", 0.5])


def test_non_integer_sizes_are_value_errors():
    with pytest.raises(ValueError, match=r"^training.steps='10': expected an integer >= 0"):
        TrainingConfig(steps="10")
    with pytest.raises(ValueError, match=r"^parallel.tp=True: expected an integer >= 1"):
        ParallelConfig(tp=True)
    with pytest.raises(ValueError, match=r"^training.eval_interval=-1: expected an integer >= 0"):
        TrainingConfig(eval_interval=-1)


def test_sequence_length_check():
    with pytest.raises(ValueError, match=r"data.seq_length=8192 exceeds model.max_position"):
        KatConfig(data=DataConfig(seq_length=8192))
