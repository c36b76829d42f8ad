"""Layout enumeration, known-good published layouts and `kat plan`: `pytest tests/planning/test_layouts.py`.

Validity rules are re-derived here from the constraints Megatron-Core enforces (an independent
statement, not a call into the planner), and two published recipes must come out valid and
fitting in 80 GB: a DeepSeek-V3-like 671B MoE at TP2 PP8 EP64 (ETP1) on 1024 GPUs (DeepSeek-V3
technical report shapes; Megatron-LM's MoE recipe layout) and a Llama-2-70B-shaped dense model at
TP8 PP2 on 768 GPUs (Megatron-LM's Llama-2 70B recipe, sequence 4096).
"""

from __future__ import annotations

import pytest

from kat_megatron.config import load_config
from kat_megatron.config.presets import get_preset
from kat_megatron.config.schema import ModelConfig
from kat_megatron.config.schema import check_layout as schema_check
from kat_megatron.models.params import count_params
from kat_megatron.planning.inventory import expand, stage_inventory
from kat_megatron.planning.layout import (
    Batch,
    Cluster,
    Layout,
    check_layout,
    enumerate_layouts,
    layout_from_overrides,
)
from kat_megatron.planning.planner import GIB, PlanOptions, evaluate, plan
from kat_megatron.planning.static import buffer_layout, static_memory

# DeepSeek-V3 shapes (61 layers: 3 dense + 58 MoE, 256 experts top-8 of width 2048 plus one
# shared expert, MTP depth 1), with 64 layers so that PP8 divides them (3 dense + 61 MoE: larger
# than the real model, so "fits" is conservative) and GQA with 16 KV groups in place of MLA.
DSV3_LIKE = ModelConfig(
    preset=None,
    num_layers=64,
    hidden_size=7168,
    num_attention_heads=128,
    num_query_groups=16,
    kv_channels=128,
    ffn_hidden_size=18432,
    vocab_size=129280,
    add_qkv_bias=False,
    num_moe_experts=256,
    moe_router_topk=8,
    moe_ffn_hidden_size=2048,
    moe_shared_expert_intermediate_size=2048,
    moe_first_k_dense=3,
    mtp_num_layers=1,
)
LLAMA2_70B = ModelConfig(
    preset=None,
    num_layers=80,
    hidden_size=8192,
    num_attention_heads=64,
    num_query_groups=8,
    ffn_hidden_size=28672,
    vocab_size=32000,
    add_qkv_bias=False,
)


def _model(name: str) -> ModelConfig:
    return ModelConfig(**get_preset(name))


def _pipeline_ok(layers: int, lay: Layout) -> bool:
    """Megatron-Core 0.16.1's split rules (TransformerConfig.__post_init__), written out again."""
    v = lay.vpp or 1
    given = [n for n in (lay.first_stage_layers, lay.last_stage_layers) if n is not None]
    extra = lay.account_for_embedding_in_pipeline_split + lay.account_for_loss_in_pipeline_split
    if extra:  # the embedding and/or loss count as layers; no first/last counts with them
        return not given and (layers + extra) % (lay.pp * v) == 0
    if not given:
        return layers % (lay.pp * v) == 0
    middle, stages = layers - sum(given), lay.pp - len(given)
    if any(n <= 0 or n % v for n in given) or middle < 0 or (middle == 0) != (stages == 0):
        return False
    return stages == 0 or (middle % stages == 0 and (middle // stages) % v == 0)


def _independently_valid(m: ModelConfig, lay: Layout, cluster: Cluster, batch: Batch) -> bool:
    experts = m.num_moe_experts or 1
    ffn_e = m.moe_ffn_hidden_size or m.ffn_hidden_size
    return (
        lay.tp * lay.pp * lay.cp * lay.dp == cluster.gpus
        and cluster.gpus_per_node % lay.tp == 0
        and m.num_attention_heads % lay.tp == 0
        and m.num_query_groups % lay.tp == 0
        and m.ffn_hidden_size % lay.tp == 0
        and _pipeline_ok(m.num_layers, lay)
        and experts % lay.ep == 0
        and cluster.gpus % ((lay.etp or lay.tp) * lay.ep * lay.pp) == 0
        and (lay.ep == 1 or m.is_moe)
        and (lay.etp is None or (lay.ep > 1 and ffn_e % lay.etp == 0))
        and batch.global_batch % (batch.micro_batch * lay.dp) == 0
        and (lay.vpp is None or (batch.global_batch // lay.dp) % lay.pp == 0)
        and (lay.cp == 1 or batch.seq_len % (2 * lay.cp) == 0)
    )


@pytest.mark.parametrize(
    "name,gpus", [("kat-v1-40b", 64), ("kat-200b-a40b", 256), ("kat-v1-40b-94", 48)]
)
def test_enumeration_agrees_with_independent_rules(name, gpus):
    """kat-v1-40b-94: 94 layers on 48 GPUs, where PP 3, 4, 6, 8, 12, 16 need uneven stages."""
    if name.endswith("-94"):
        m, batch = ModelConfig(**{**get_preset("kat-v1-40b"), "num_layers": 94}), Batch(8192, 768)
    else:
        m, batch = _model(name), Batch(8192, 512)
    cluster = Cluster(gpus)
    valid, rejected = enumerate_layouts(m, cluster, batch)
    assert valid and rejected
    for lay in valid:
        assert _independently_valid(m, lay, cluster, batch), lay
    for r in rejected:
        assert r.reason and not _independently_valid(m, r.layout, cluster, batch), r


@pytest.mark.parametrize(
    "name,layout,gpus,batch,reason",
    [
        ("kat-v1-40b", Layout(tp=16, dp=4), 64, Batch(8192, 512), "inside a node"),
        ("kat-v1-40b", Layout(tp=1, pp=3, dp=1), 3, Batch(8192, 3), "num_layers=80"),
        ("kat-v1-40b", Layout(tp=8, pp=1, dp=1, ep=2), 8, Batch(8192, 8), "needs an MoE"),
        ("kat-v1-40b", Layout(tp=8, pp=2, dp=4), 64, Batch(8192, 510), "not a multiple"),
        ("kat-v1-40b", Layout(tp=8, pp=4, vpp=2, dp=2), 64, Batch(8192, 6), "divisible by PP4"),
        ("kat-v1-40b", Layout(tp=8, cp=4, dp=2), 64, Batch(8190, 512), "divisible by 2*cp"),
        ("kat-200b-a40b", Layout(tp=8, pp=8, dp=4, ep=8), 256, Batch(8192, 512), "etp*ep*pp"),
        ("kat-200b-a40b", Layout(tp=1, pp=1, dp=256, ep=128), 256, Batch(8192, 512), "64"),
        ("kat-200b-a40b", Layout(tp=2, pp=8, dp=16, etp=1), 256, Batch(8192, 512), "EP > 1"),
    ],
)
def test_invalid_layouts_are_rejected_with_a_reason(name, layout, gpus, batch, reason):
    got = check_layout(_model(name), layout, Cluster(gpus), batch)
    assert got is not None and reason in got, got


def test_kv_groups_reason_on_a_ten_gpu_node():
    # 40 heads split 5 ways, but 8 KV groups do not
    got = check_layout(_model("kat-v1-40b"), Layout(tp=5, dp=2), Cluster(10, 10), Batch(8192, 8))
    assert "num_query_groups=8" in got


@pytest.mark.parametrize(
    "model,layout,gpus,gbs",
    [
        (DSV3_LIKE, Layout(tp=2, pp=8, dp=64, ep=64, etp=1), 1024, 15360),
        (LLAMA2_70B, Layout(tp=8, pp=2, dp=48), 768, 1536),
    ],
    ids=["deepseek-v3-like-tp2-pp8-ep64", "llama2-70b-tp8-pp2"],
)
def test_published_layouts_are_found_and_fit(model, layout, gpus, gbs):
    opts = PlanOptions(gpus=gpus, gpu_mem_gb=80, seq_len=4096, global_batch=gbs)
    valid, _ = enumerate_layouts(model, opts.cluster, opts.batch)
    assert layout in valid
    p = evaluate(model, layout, opts)
    print(f"{layout.label()}: {p.memory.total / GIB:.1f} GiB with recompute {p.recompute}")
    assert p.fits and p.memory.total <= 80 * GIB
    # ... and the check has teeth: without model parallelism neither comes close
    lean = evaluate(model, Layout(dp=gpus), opts)
    assert not lean.fits and lean.memory.static.total_bytes > 80 * GIB


def test_dsv3_like_is_671b_class():
    total = count_params(DSV3_LIKE).total
    assert 671e9 < total < 740e9


@pytest.mark.parametrize(
    "layout", [Layout(tp=2, pp=8, dp=16, ep=8, etp=1), Layout(tp=8, pp=4, dp=8, ep=8)]
)
def test_fast_static_path_matches_buffer_simulation(layout):
    """The closed form used in the search equals Megatron's index arithmetic, replayed
    parameter by parameter, for the 200B model; and bytes/param follow 2 + 4 + 12/DP."""
    m = _model("kat-200b-a40b")
    for pp_rank in (0, layout.pp - 1):
        fast = static_memory(m, layout, pp_rank)
        slow_grads = 0
        for chunk in stage_inventory(m, layout, pp_rank):
            params = expand(chunk)
            dense = [p for p in params if not p.expert]
            expert = [p for p in params if p.expert]
            slow_grads += 4 * buffer_layout(dense, layout.dp * layout.cp, True, None).numel
            slow_grads += 4 * buffer_layout(expert, layout.expert_dp, True, None).numel
        assert fast.grad_bytes == slow_grads
        n = fast.numel
        assert abs(fast.params_bytes / (2 * n) - 1) < 1e-3
        assert fast.optimizer_bytes <= 12 * n / layout.expert_dp + 12 * n / layout.dp


def test_plan_ranks_fitting_layouts_and_prints_valid_overrides():
    m = _model("kat-v1-40b")
    result = plan(m, PlanOptions(gpus=64, seq_len=8192), "kat-v1-40b")
    assert result.fitting and result.plans[0].fits
    times = [p.cost.step_s for p in result.fitting]
    assert times == sorted(times)
    for p in result.fitting[:5]:
        overrides = ["model.preset=kat-v1-40b", *p.overrides(result.options.batch)]
        cfg = load_config(None, overrides)  # what `kat train` would accept
        schema_check(cfg.model, cfg.parallel, world_size=64)
        assert layout_from_overrides(overrides[1:], 64) == p.layout


def test_kat_plan_cli(capsys):
    from kat_megatron.cli import main

    assert main(["plan", "kat-v1-40b", "--gpus", "64", "--top", "3", "--seq-len", "32768"]) == 0
    out = capsys.readouterr().out
    assert "kat-v1-40b on 64 GPUs" in out and "model.preset=kat-v1-40b parallel.tp=" in out
    assert main(["plan", "kat-v1-40b", "--gpus", "64", "--layout", "parallel.tp=8"]) == 0
    assert "TP8 PP1 EP1 CP1 DP8" in capsys.readouterr().out
    assert main(["plan", "kat-v1-40b", "--gpus", "64", "--layout", "parallel.tp=16"]) == 2
    assert "inside a node" in capsys.readouterr().err


def test_experts_may_spread_over_tensor_parallel_ranks():
    """EP need not divide DP x CP (Megatron-Core 0.16.1): TP8 EP8 ETP1 on one node (DP 1)."""
    m = _model("kat-200b-a40b")
    lay = Layout(tp=8, pp=1, dp=1, ep=8, etp=1)
    assert check_layout(m, lay, Cluster(8), Batch(4096, 8)) is None
    valid, _ = enumerate_layouts(m, Cluster(8), Batch(4096, 8))
    assert lay in valid


_EMB, _LOSS = "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"


@pytest.mark.parametrize(
    "layers,pp,vpp,first,last,flags",
    [(4, 2, None, None, None, {}), (5, 2, None, 2, None, {}), (5, 2, None, None, 2, {}),
     (10, 4, None, 2, 2, {}), (12, 3, 2, 2, 2, {}), (14, 4, 2, None, 2, {}),
     (7, 3, None, 3, None, {}), (16, 4, 2, None, None, {}),
     (6, 2, None, None, None, {_EMB: True, _LOSS: True}), (5, 2, None, None, None, {_EMB: True}),
     (7, 2, 2, None, None, {_LOSS: True}), (14, 4, 2, None, None, {_EMB: True, _LOSS: True}),
     (126, 8, 8, None, None, {_EMB: True, _LOSS: True}),
     (94, 8, 4, None, None, {_EMB: True, _LOSS: True})],
)  # fmt: skip
def test_chunk_layers_match_megatron_core(layers, pp, vpp, first, last, flags):
    """Our layer ranges per (pipeline rank, virtual stage) are Megatron-Core's own
    (`get_num_layers_to_build`, `get_transformer_layer_offset`, which models/specs.py uses),
    with the embedding and/or loss counted as layers too (Llama-3.1-405B's 126 layers on
    PP8 x VPP8, Qwen3-235B's 94 on PP8 x VPP4: Megatron-Bridge's recipes)."""
    import torch
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from kat_megatron.planning.inventory import chunk_layers

    config = TransformerConfig(
        num_layers=layers, hidden_size=8, num_attention_heads=2,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        pipeline_dtype=torch.float32, **flags,
    )  # fmt: skip
    model = ModelConfig(num_layers=layers)
    lay = Layout(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last, **flags)
    seen = []
    for r in range(pp):
        for vp in range(vpp or 1):
            v = vp if vpp else None
            n = get_num_layers_to_build(config, vp_stage=v, pp_rank=r)
            offset = get_transformer_layer_offset(config, vp_stage=v, pp_rank=r)
            assert chunk_layers(model, lay, r, vp) == range(offset, offset + n), (r, vp)
            seen += list(range(offset, offset + n))
    assert sorted(seen) == list(range(layers))


def test_uneven_split_candidates():
    from kat_megatron.planning.layout import uneven_split

    assert uneven_split(126, 8, None) == (15, 15)  # Megatron-LM's 405B split
    assert uneven_split(94, 8, None) == (11, 11)
    assert uneven_split(80, 16, None) == (None, None) or 80 % 16 == 0
    first, last = uneven_split(61, 16, None)
    assert (first or 4) + (last or 4) + 14 * 4 == 61


def test_split_fields_counts_embedding_and_loss_where_first_last_cannot():
    from kat_megatron.planning.layout import split_fields

    assert split_fields(80, 8, 5) == ()  # even
    # 126 on PP8: first/last (15, 15) gives the same stages as counting embedding and loss
    assert dict(split_fields(126, 8, None)) == {"first_stage_layers": 15, "last_stage_layers": 15}
    # with VPP8 only Megatron-Core's embedding + loss accounting splits them (128 = 8 x 8 x 2)
    assert dict(split_fields(126, 8, 8)) == {_EMB: True, _LOSS: True}
    assert dict(split_fields(94, 8, 4)) == {_EMB: True, _LOSS: True}  # 96 = 8 x 4 x 3
    assert split_fields(95, 8, 8) is None
    lay = Layout(tp=8, pp=8, vpp=8, cp=2, dp=8, **dict(split_fields(126, 8, 8)))
    assert lay.label() == "TP8 PP8(emb,loss) VPP8 EP1 CP2 DP8"
    assert layout_from_overrides(lay.overrides(), 1024) == lay
    cfg = load_config(None, ["model.preset=kat-v1-40b", "model.num_layers=126", *lay.overrides()])
    assert cfg.parallel.account_for_embedding_in_pipeline_split


def test_embedding_in_split_lightens_the_first_stage():
    """94 layers + embedding + loss on PP8: 11 + 6 x 12 + 11 decoder layers; the plan evaluates the
    second stage too, which holds a full share."""
    m = ModelConfig(**{**get_preset("kat-v1-40b"), "num_layers": 94})
    lay = Layout(tp=8, pp=8, dp=1, **{_EMB: True, _LOSS: True})
    assert check_layout(m, lay, Cluster(64), Batch(8192, 64)) is None
    p = evaluate(m, lay, PlanOptions(gpus=64, global_batch=64))
    assert sorted(p.stage_totals) == [0, 1, 7]
    uneven = Layout(tp=8, pp=8, dp=1, first_stage_layers=11, last_stage_layers=11)
    q = evaluate(m, uneven, PlanOptions(gpus=64, global_batch=64))
    assert p.stage_totals == pytest.approx(q.stage_totals)  # the same stages, so the same memory


def test_uneven_layout_is_evaluated_per_stage():
    """94 layers on PP8 as 11 + 6 x 12 + 11: the lighter first stage holds fewer parameters than
    the second, and the plan evaluates the second stage too (it may be the largest)."""
    m = ModelConfig(**{**get_preset("kat-v1-40b"), "num_layers": 94})
    lay = Layout(tp=8, pp=8, dp=1, first_stage_layers=11, last_stage_layers=11)
    assert check_layout(m, lay, Cluster(64), Batch(8192, 64)) is None
    p = evaluate(m, lay, PlanOptions(gpus=64, global_batch=64))
    assert sorted(p.stage_totals) == [0, 1, 7]
    first, second = static_memory(m, lay, 0), static_memory(m, lay, 1)
    layer = static_memory(m, Layout(tp=8, pp=94, dp=1), 1).numel  # one layer's parameters
    emb = first.numel - 11 * layer
    assert second.numel == 12 * layer and emb > 0
