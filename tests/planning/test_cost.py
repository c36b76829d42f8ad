"""The step-time model of `kat plan` (issue 20.3): `timeout 120 .venv/bin/python -m pytest
tests/planning/test_cost.py -q`. Each property is checked against an explicit formula."""

from __future__ import annotations

import dataclasses

import pytest

from kat_megatron.planning.cost import Hardware, _alltoall_s, _gemm_eff, matmul_efficiency
from kat_megatron.planning.layout import Layout
from kat_megatron.planning.planner import PlanOptions, evaluate
from kat_megatron.planning.recipes import LLAMA3_70B, QWEN3_30B_A3B


@pytest.mark.parametrize("k,e", [(8192, 0.776), (2048, 0.711), (768, 0.600), (256, 0.400)])
def test_gemm_efficiency_anchor_points(k, e):
    assert _gemm_eff(k, Hardware()) == pytest.approx(e, abs=1e-3)


def test_layer_efficiency_falls_with_smaller_per_gpu_shapes():
    opts = PlanOptions(gpus=64, seq_len=8192).activation_options("none")
    hw = Hardware()
    effs = [
        matmul_efficiency(LLAMA3_70B, Layout(tp=t, dp=64 // t), opts, False, hw) for t in (1, 8)
    ]
    assert effs[0] > effs[1]
    cp = matmul_efficiency(LLAMA3_70B, Layout(cp=8, dp=8), opts, False, hw)
    assert cp < effs[0]  # 1K tokens per micro-batch instead of 8K
    # experts: the GEMM's token dimension is what one expert receives, T * EP * k / E
    moe = PlanOptions(gpus=16, seq_len=4096).activation_options("none")
    few = matmul_efficiency(QWEN3_30B_A3B, Layout(ep=1, dp=16), moe, True, hw)
    many = matmul_efficiency(QWEN3_30B_A3B, Layout(ep=16, etp=1, dp=16), moe, True, hw)
    assert few < many


def test_fp8_gemms_run_faster_and_attention_does_not():
    """With model.fp8 each GEMM takes 1 / fp8_gemm_speedup of its bf16 time; attention's QK^T /
    PV keep `attn_eff`: the layer efficiency is the harmonic mean written out again."""
    from kat_megatron.planning.cost import _layer_parts

    opts = PlanOptions(gpus=64, seq_len=8192).activation_options("none")
    hw, lay = Hardware(), Layout(tp=4, pp=8, vpp=5, dp=2)
    fp8 = dataclasses.replace(LLAMA3_70B, fp8="hybrid", fp8_recipe="tensorwise")
    parts, attn = _layer_parts(LLAMA3_70B, lay, opts, False)
    work = sum(f for f, _ in parts) + attn
    for model, speed in ((LLAMA3_70B, 1.0), (fp8, hw.fp8_gemm_speedup)):
        seconds = sum(f / (speed * _gemm_eff(k, hw)) for f, k in parts) + attn / hw.attn_eff
        eff = matmul_efficiency(model, lay, opts, False, hw)
        assert eff == pytest.approx(work / seconds)
    assert matmul_efficiency(fp8, lay, opts, False, hw) < hw.fp8_gemm_speedup * matmul_efficiency(
        LLAMA3_70B, lay, opts, False, hw
    )  # attention holds the layer below the GEMMs' speed-up


def test_alltoall_across_nodes_sends_the_remote_share_over_infiniband():
    """Of the 15 peers of an EP16 group on two nodes, 8 are on the other node: 8/15 of the bytes
    cross InfiniBand while 7/15 move over NVLink at the same time (the slower sets the time)."""
    hw = Hardware()
    nvl, ib = hw.nvlink_gbs * 1e9, hw.ib_gbs * 1e9
    assert _alltoall_s(1e9, 8, 1, 8, hw) == pytest.approx(1e9 / nvl)
    assert _alltoall_s(1e9, 16, 1, 8, hw) == pytest.approx(
        max(8 / 15 * 1e9 / ib, 7 / 15 * 1e9 / nvl)
    )
    # EP4 strided by ETP4 over 16 ranks: two members per node, two of the three peers remote
    assert _alltoall_s(1e9, 4, 4, 8, hw) == pytest.approx(2 / 3 * 1e9 / ib)
    assert _alltoall_s(1e9, 1, 1, 8, hw) == 0.0


def test_bubble_uses_the_layouts_micro_batch_count():
    lay = Layout(tp=4, pp=4, vpp=5, cp=2, dp=2)
    opts = PlanOptions(gpus=64, seq_len=8192, global_batch=128)
    p = evaluate(LLAMA3_70B, lay, opts)
    m = 128 // (2 * 1)
    assert p.microbatches == m
    assert p.cost.bubble == pytest.approx((4 - 1) / (m * 5))


def test_dp_overlap_hides_communication_but_not_all_of_it():
    """The reduce-scatter hides behind the last micro-batch's backward (2/3 of one micro-batch's
    compute + launch overhead), all but one bucket; the all-gather (2 bytes per parameter against
    the 4 of fp32 gradients) stays exposed either way."""
    lay = Layout(tp=8, pp=1, dp=8)
    base = PlanOptions(gpus=64, seq_len=8192, global_batch=128, recompute="full")
    for seq in (8192, 2048):  # a 4x shorter micro-batch: a 4x shorter window
        opts = dataclasses.replace(base, seq_len=seq)
        off = evaluate(LLAMA3_70B, lay, opts)
        on = evaluate(LLAMA3_70B, lay, dataclasses.replace(opts, overlap_grad_reduce=True))
        ib = Hardware().ib_gbs * 1e9  # the DP group spans nodes
        rs, ag = off.cost.dp_bytes * 4 / 6 / ib, off.cost.dp_bytes * 2 / 6 / ib
        assert off.cost.parts["dp"] == pytest.approx(rs + ag)
        window = (on.cost.parts["compute"] + on.cost.parts["overhead"]) / (128 // 8) * 2 / 3
        exposed = max(rs / Hardware().dp_buckets, rs - window)
        assert on.cost.parts["dp"] == pytest.approx(exposed + ag, rel=1e-6)
        assert 0 < exposed < rs
    assert on.cost.parts["dp"] > ag + rs / Hardware().dp_buckets  # 2048: window < 7/8 of rs


def test_fp8_primary_weights_halve_the_parameter_all_gather():
    lay = Layout(tp=8, pp=1, dp=8)
    opts = PlanOptions(gpus=64, seq_len=8192, global_batch=128, recompute="full")
    fp8 = dataclasses.replace(LLAMA3_70B, fp8="hybrid", fp8_recipe="tensorwise", fp8_param=True)
    bf16, f8 = evaluate(LLAMA3_70B, lay, opts), evaluate(fp8, lay, opts)
    assert f8.cost.dp_bytes == pytest.approx(bf16.cost.dp_bytes * (4 + 1) / (4 + 2))


def test_pipeline_p2p_hides_behind_compute_with_vpp_overlap():
    """With VPP and parallel.overlap_p2p_comm (its default there) the sends and receives run
    behind the next chunk's compute; off, or without VPP, each one is on the critical path:
    2 (activation, gradient) x m x VPP transfers of T/TP x h bf16 over the PP link."""
    lay = Layout(tp=4, pp=8, vpp=5, dp=2)
    opts = PlanOptions(gpus=64, seq_len=8192, global_batch=128, recompute="none")
    on = evaluate(LLAMA3_70B, lay, opts)
    off = evaluate(LLAMA3_70B, lay, dataclasses.replace(opts, overlap_p2p_comm=False))
    m = 128 // 2
    sent = 2 * m * 5 * 8192 / 4 * LLAMA3_70B.hidden_size * 2
    assert on.cost.pp_bytes == off.cost.pp_bytes == pytest.approx(sent)
    assert off.cost.parts["pp"] == pytest.approx(sent / (Hardware().ib_gbs * 1e9))
    assert on.cost.parts["pp"] == 0.0
    plain = evaluate(LLAMA3_70B, Layout(tp=4, pp=8, dp=2), opts)
    assert plain.cost.parts["pp"] > 0


def _bf16_grads(**kw) -> PlanOptions:
    return PlanOptions(grad_reduce_dtype="bf16", **kw)


def test_bubble_idles_the_whole_micro_batch_critical_path():
    """(pp - 1) / (m vpp) of everything a micro-batch waits for on the stage: compute, launch
    overhead and the exposed TP / EP / CP / PP communication (DP, once per step, excluded)."""
    lay = Layout(tp=4, pp=4, vpp=5, cp=2, dp=2)
    p = evaluate(LLAMA3_70B, lay, PlanOptions(gpus=64, seq_len=8192, global_batch=128))
    parts = p.cost.parts
    path = sum(v for k, v in parts.items() if k not in ("bubble", "dp"))
    assert parts["bubble"] == pytest.approx(p.cost.bubble * path)
    assert p.cost.step_s == pytest.approx(path * (1 + p.cost.bubble) + parts["dp"])


def test_tp_backward_regather_and_reduce_scatter_hide_behind_gemms():
    """Per block and micro-batch with SP: forward all-gather + reduce-scatter and backward
    output-gradient all-gather are exposed (3); the backward's input re-gather and gradient
    reduce-scatter run behind the dgrad / wgrad GEMMs (2 more, counted in the bytes)."""
    lay = Layout(tp=8, dp=8)
    opts = PlanOptions(gpus=64, seq_len=8192, global_batch=128, recompute="none")
    p = evaluate(LLAMA3_70B, lay, opts)
    m, layers, h = 128 // 8, LLAMA3_70B.num_layers, LLAMA3_70B.hidden_size
    one = 8192 * h * 2 * 7 / 8  # one all-gather / reduce-scatter of T x h, bf16, per GPU
    assert p.cost.tp_bytes == pytest.approx(m * layers * 2 * 5 * one)
    assert p.cost.parts["tp"] == pytest.approx(
        m * layers * 2 * 3 * one / (Hardware().nvlink_gbs * 1e9)
    )


def test_full_recompute_reruns_the_forward_alltoalls():
    lay = Layout(tp=1, ep=16, etp=1, dp=16)
    base = dict(gpus=16, seq_len=4096, global_batch=1024)
    none = evaluate(QWEN3_30B_A3B, lay, _bf16_grads(recompute="none", **base))
    full = evaluate(QWEN3_30B_A3B, lay, _bf16_grads(recompute="full", **base))
    assert full.cost.ep_bytes == pytest.approx(1.5 * none.cost.ep_bytes)


def test_expert_gemm_gets_the_tokens_of_its_ep_group():
    """An expert's GEMM runs over T' x ETP x EP x k / E tokens (T' = T / TP under SP): with TP2,
    ETP1 halves what an expert receives compared with ETP2."""
    from kat_megatron.planning.cost import _layer_parts
    from kat_megatron.planning.recipes import GPT_OSS_120B

    opts = PlanOptions(gpus=64, seq_len=4096).activation_options("none")
    m = GPT_OSS_120B
    k, e = m.moe_router_topk, m.num_moe_experts
    for etp, width in ((1, m.moe_ffn_hidden_size), (2, m.moe_ffn_hidden_size / 2)):
        parts, _ = _layer_parts(m, Layout(tp=2, ep=8, etp=etp, dp=32), opts, True)
        tokens = 4096 / 2 * etp * 8 * k / e
        assert parts[2][1] == min(tokens, m.hidden_size, width)
