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
from kat_megatron.config.schema import pipeline_split


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
    assert msg == (
        "parallel.pp=3 does not divide model.num_layers=4; choose pp from [1, 2, 4] or set "
        "parallel.first_stage_layers/last_stage_layers"
    )


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


def test_world_size_must_be_divisible_by_etp_ep_pp():
    """Megatron-Core 0.16.1's rule (initialize_model_parallel): world % (etp * ep * pp) == 0;
    EP need not divide DP x CP (experts spread over the tensor-parallel ranks)."""
    msg = _layout_error(_moe(), ParallelConfig(ep=4), world_size=2)
    assert msg.startswith("world size 2 is not divisible by etp*ep*pp=4")
    check_layout(_moe(), ParallelConfig(tp=2, ep=2, etp=1), world_size=2)  # DP = 1
    check_layout(_moe(num_query_groups=4), ParallelConfig(tp=4, ep=4, etp=1), world_size=4)
    msg = _layout_error(_moe(), ParallelConfig(tp=2, ep=2), world_size=2)  # etp = tp = 2
    assert msg.startswith("world size 2 is not divisible by etp*ep*pp=4")


@pytest.mark.parametrize(
    "layers,pp,vpp,first,last",
    [(5, 2, None, 2, None), (5, 2, None, None, 2), (6, 3, None, 1, 1), (10, 4, None, 2, 2),
     (12, 3, 2, 2, 2), (14, 4, 2, None, 2), (7, 3, None, 3, None), (4, 2, None, 1, 3)],
)  # fmt: skip
def test_uneven_pipeline_accepted_as_megatron_core_does(layers, pp, vpp, first, last):
    par = ParallelConfig(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
    split = pipeline_split(layers, par)
    assert sum(split) == layers and len(split) == pp
    assert (first or split[0], last or split[-1]) == (split[0], split[-1])
    check_layout(ModelConfig(num_layers=layers), par)


@pytest.mark.parametrize(
    "layers,pp,vpp,first,last",
    [(5, 2, None, 2, 2), (6, 3, None, 3, None), (12, 3, 2, 3, 3), (12, 4, 2, 2, 1),
     (4, 2, None, 4, None), (10, 4, 2, 2, 2)],
)  # fmt: skip
def test_uneven_pipeline_refused_as_megatron_core_does(layers, pp, vpp, first, last):
    par = ParallelConfig(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
    msg = _layout_error(ModelConfig(num_layers=layers), par)
    assert "parallel." in msg


def test_uneven_pipeline_agrees_with_megatron_core_config():
    """Our split is valid exactly when Megatron-Core's TransformerConfig accepts it."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    for layers in (4, 5, 7, 12):
        for pp, vpp in ((2, None), (3, None), (4, None), (3, 2), (4, 2)):
            for first in (None, 1, 2, 3, 4):
                for last in (None, 1, 2, 3, 4):
                    if (first is None and last is None) or (first or 0) + (last or 0) > layers:
                        continue  # Megatron-Core accepts a negative middle; we refuse it
                    par = ParallelConfig(
                        pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last
                    )
                    try:
                        pipeline_split(layers, par)
                        ours = True
                    except ValueError:
                        ours = False
                    try:
                        TransformerConfig(
                            num_layers=layers, hidden_size=8, num_attention_heads=2,
                            pipeline_model_parallel_size=pp,
                            virtual_pipeline_model_parallel_size=vpp,
                            num_layers_in_first_pipeline_stage=first,
                            num_layers_in_last_pipeline_stage=last,
                            pipeline_dtype=__import__("torch").float32,
                        )  # fmt: skip
                        theirs = True
                    except ValueError:
                        theirs = False
                    assert ours == theirs, (layers, pp, vpp, first, last)


_ACCOUNT = ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split")


def test_embedding_and_loss_in_split_agree_with_megatron_core_config():
    """`pipeline_split` with the embedding and/or the loss counted as layers is valid exactly when
    Megatron-Core's TransformerConfig accepts it, and gives the layers its ranks build."""
    import torch
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    for layers in range(2, 15):
        for pp, vpp in ((2, None), (3, None), (4, None), (2, 2), (3, 2), (2, 3)):
            for emb, loss in ((True, True), (True, False), (False, True)):
                flags = dict(zip(_ACCOUNT, (emb, loss)))
                par = ParallelConfig(pp=pp, vpp=vpp, **flags)
                try:
                    split = pipeline_split(layers, par)
                except ValueError:
                    split = None
                try:
                    config = TransformerConfig(
                        num_layers=layers, hidden_size=8, num_attention_heads=2,
                        pipeline_model_parallel_size=pp,
                        virtual_pipeline_model_parallel_size=vpp,
                        pipeline_dtype=torch.float32, **flags,
                    )  # fmt: skip
                except ValueError:
                    config = None
                assert (split is None) == (config is None), (layers, pp, vpp, emb, loss)
                if config is None:
                    continue
                built = [
                    sum(
                        get_num_layers_to_build(config, vp_stage=v if vpp else None, pp_rank=r)
                        for v in range(vpp or 1)
                    )
                    for r in range(pp)
                ]
                assert built == split, (layers, pp, vpp, emb, loss)


def test_embedding_and_loss_in_split_reach_the_model_config():
    """kat's TransformerConfig carries the options, and a tiny model's two stages build the
    layers they imply: 5 layers + the embedding on PP2 is 3 + 3 slots, i.e. 2 + 3 layers."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from kat_megatron.config.presets import get_preset
    from kat_megatron.models.builder import transformer_config

    model = ModelConfig(**{**get_preset("tiny-dense"), "num_layers": 5})
    for flag, expect in ((_ACCOUNT[0], [(0, 2), (2, 3)]), (_ACCOUNT[1], [(0, 3), (3, 2)])):
        par = ParallelConfig(pp=2, **{flag: True})
        config = transformer_config(model, par, precision="fp32")
        assert getattr(config, flag) and not getattr(config, next(a for a in _ACCOUNT if a != flag))
        got = [
            (
                get_transformer_layer_offset(config, pp_rank=r),
                get_num_layers_to_build(config, pp_rank=r),
            )
            for r in range(2)
        ]
        assert got == expect, flag
        assert [n for _, n in got] == pipeline_split(5, par)


def test_embedding_and_loss_in_split_rules():
    with pytest.raises(
        ValueError, match="account_for_loss_in_pipeline_split needs parallel.pp > 1"
    ):
        ParallelConfig(account_for_loss_in_pipeline_split=True)
    with pytest.raises(ValueError, match="cannot be combined"):
        ParallelConfig(pp=2, first_stage_layers=2, account_for_embedding_in_pipeline_split=True)
    with pytest.raises(ValueError, match="expected true or false"):
        ParallelConfig(pp=2, account_for_embedding_in_pipeline_split=1)
    msg = _layout_error(ModelConfig(num_layers=126), ParallelConfig(pp=8, vpp=8))
    assert "does not divide model.num_layers=126" in msg
    both = dict(zip(_ACCOUNT, (True, True)))
    assert pipeline_split(126, ParallelConfig(pp=8, vpp=8, **both)) == [15] + [16] * 6 + [15]
    emb_only = ParallelConfig(pp=8, account_for_embedding_in_pipeline_split=True)
    assert "model.num_layers=126 + 1" in _layout_error(ModelConfig(num_layers=126), emb_only)


def test_stage_layers_need_pp():
    with pytest.raises(ValueError, match="parallel.first_stage_layers needs parallel.pp > 1"):
        ParallelConfig(first_stage_layers=2)


def test_kat_config_runs_layout_checks():
    with pytest.raises(ValueError, match=r"parallel.tp=3 does not divide model.num_attention"):
        KatConfig(parallel=ParallelConfig(tp=3))


def test_fp8_needs_transformer_engine_backend():
    with pytest.raises(ValueError) as info:
        ModelConfig(fp8="hybrid", backend="local")
    assert str(info.value) == "model.fp8 needs Transformer Engine: set model.backend=te (or auto)"
    ModelConfig(fp8="hybrid", backend="te")


def test_overlap_p2p_comm_defaults_to_the_interleaved_schedule():
    """None: on with vpp (Megatron-Bridge's CommOverlapConfig), and the builder then turns
    batched p2p off, which Megatron-Core refuses together with the overlap."""
    from kat_megatron.models.builder import transformer_config

    assert ParallelConfig(pp=2, vpp=2).p2p_overlap and not ParallelConfig(pp=2).p2p_overlap
    assert not ParallelConfig(pp=2, vpp=2, overlap_p2p_comm=False).p2p_overlap
    with pytest.raises(ValueError, match=r"^parallel.overlap_p2p_comm=true needs parallel.vpp"):
        ParallelConfig(pp=2, overlap_p2p_comm=True)
    with pytest.raises(ValueError, match=r"^parallel.overlap_p2p_comm='yes': expected true"):
        ParallelConfig(pp=2, vpp=2, overlap_p2p_comm="yes")
    model = ModelConfig(num_layers=4)
    on = transformer_config(model, ParallelConfig(pp=2, vpp=2), "fp32")
    off = transformer_config(model, ParallelConfig(pp=2), "fp32")
    assert (on.overlap_p2p_comm, on.batch_p2p_comm) == (True, False)
    assert (off.overlap_p2p_comm, off.batch_p2p_comm) == (False, True)


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


def test_grad_reduce_dtype():
    assert OptimizerConfig().grad_reduce_dtype == "fp32"
    with pytest.raises(ValueError, match=r"optimizer.grad_reduce_dtype='fp16'"):
        OptimizerConfig(grad_reduce_dtype="fp16")
    bf16 = OptimizerConfig(grad_reduce_dtype="bf16")
    KatConfig(optimizer=bf16, training=TrainingConfig(precision="bf16"))
    for precision in ("fp32", "fp16"):
        with pytest.raises(ValueError, match="needs bf16 parameters") as info:
            KatConfig(optimizer=bf16, training=TrainingConfig(precision=precision))
        assert "\n" not in str(info.value)


def test_grad_reduce_dtype_maps_onto_megatron_ddp():
    import torch

    from kat_megatron.training.optimizer import grad_reduce_in_fp32

    cfg = KatConfig(optimizer=OptimizerConfig(grad_reduce_dtype="bf16"))
    assert grad_reduce_in_fp32(cfg, torch.bfloat16) is False
    with pytest.raises(ValueError, match="needs bf16 parameters"):  # precision auto on CPU
        grad_reduce_in_fp32(cfg, torch.float32)
    assert grad_reduce_in_fp32(KatConfig(), torch.bfloat16) is True


def test_swiglu_fusion():
    assert ModelConfig().swiglu_fused and ModelConfig(swiglu_fusion=True).swiglu_fused
    assert not ModelConfig(swiglu_fusion=False).swiglu_fused
    assert not ModelConfig(activation="gelu").swiglu_fused
    with pytest.raises(ValueError, match="needs model.activation=swiglu"):
        ModelConfig(activation="gelu", swiglu_fusion=True)
    with pytest.raises(ValueError, match="model.swiglu_fusion='yes'"):
        ModelConfig(swiglu_fusion="yes")
