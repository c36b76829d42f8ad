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


def test_alltoall_across_nodes_sends_the_remote_share_over_infiniband():
    hw = Hardware()
    inside = _alltoall_s(1e9, 8, 8, hw)
    assert inside == pytest.approx(1e9 / (hw.nvlink_gbs * 1e9))
    two_nodes = _alltoall_s(1e9, 16, 8, hw)
    assert two_nodes == pytest.approx(0.5e9 / (hw.ib_gbs * 1e9) + 0.5e9 / (hw.nvlink_gbs * 1e9))


def test_bubble_uses_the_layouts_micro_batch_count():
    lay = Layout(tp=4, pp=4, vpp=5, cp=2, dp=2)
    opts = PlanOptions(gpus=64, seq_len=8192, global_batch=128)
    p = evaluate(LLAMA3_70B, lay, opts)
    m = 128 // (2 * 1)
    assert p.microbatches == m
    assert p.cost.bubble == pytest.approx((4 - 1) / (m * 5))


def test_dp_overlap_hides_communication_but_not_all_of_it():
    lay = Layout(tp=8, pp=1, dp=8)
    base = PlanOptions(gpus=64, seq_len=8192, global_batch=128, recompute="full")
    off = evaluate(LLAMA3_70B, lay, base)
    on = evaluate(LLAMA3_70B, lay, dataclasses.replace(base, overlap_grad_reduce=True))
    assert on.cost.step_s < off.cost.step_s
    no_dp = off.cost.dp_bytes / (Hardware().ib_gbs * 1e9)  # DP group spans nodes
    hidden = off.cost.step_s - on.cost.step_s
    assert hidden == pytest.approx(no_dp * (1 - 1 / Hardware().dp_buckets), rel=1e-6)
