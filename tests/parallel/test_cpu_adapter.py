"""Each patch of the CPU adaptation layer (kat_megatron/parallel/cpu_adapter.py), tested alone.

The layer is process-global by design (it is applied once per CPU process), so these tests apply
it in the test process; the rest of the suite runs on CPU under it anyway.
"""

from __future__ import annotations

import pytest
import torch

from kat_megatron.parallel import cpu_adapter

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only adaptation layer")


@pytest.fixture(scope="module", autouse=True)
def applied():
    return cpu_adapter.apply()


def test_all_patches_applied_and_idempotent(applied):
    assert applied == list(cpu_adapter.PATCHES)
    assert cpu_adapter.apply() == applied


def test_device_mode_maps_cuda_factories_to_cpu():
    for dev in ("cuda", "cuda:0", 0, torch.device("cuda")):
        t = torch.zeros(3, device=dev)
        assert t.device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to(device="cuda").device.type == "cpu"
    assert torch.empty(2, device="cpu", pin_memory=True).device.type == "cpu"


def test_device_mode_reports_cuda_type_names():
    assert torch.nn.Parameter(torch.ones(1)).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    # type(dtype) conversion is untouched
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def test_cuda_runtime_calls_are_cpu_noops():
    assert torch.cuda.current_device() == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        s.wait_stream(torch.cuda.current_stream())
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    assert e.query()
    assert torch.cuda.max_memory_allocated() == 0


def test_rng_tracker_forks_cpu_generator():
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(force_reset=True)
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(0)
    tracker.add("a", 123)
    outside_before = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(4)
    # leaving the fork restores the default generator exactly
    assert torch.equal(torch.get_rng_state(), outside_before)
    # the forked stream continues where it stopped, and equals a fresh generator seeded 123
    with tracker.fork("a"):
        second = torch.rand(4)
    ref = torch.Generator().manual_seed(123)
    assert torch.equal(first, torch.rand(4, generator=ref))
    assert torch.equal(second, torch.rand(4, generator=ref))


def test_alltoall_split_sizes_accept_tensors():
    import torch.distributed as dist

    wrapped = dist.all_to_all_single
    assert getattr(wrapped, "_kat_cpu", False)
    assert cpu_adapter._as_list(torch.tensor([1, 2])) == [1, 2]
    assert cpu_adapter._as_list([3]) == [3]


def test_te_general_gemm_defined_without_te():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


def test_version_gate(monkeypatch):
    monkeypatch.setattr(cpu_adapter, "_APPLIED", [])
    monkeypatch.setattr(cpu_adapter, "installed_mcore", lambda: "0.99.0")
    with pytest.raises(RuntimeError, match="megatron-core==0.16.1"):
        cpu_adapter.apply()


def test_refuses_on_cuda_machines(monkeypatch):
    monkeypatch.setattr(cpu_adapter, "_APPLIED", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must not be applied"):
        cpu_adapter.apply()


def test_causal_masks_built_on_cpu_match_megatron_definition():
    from megatron.core.transformer import utils

    m = utils.get_default_causal_mask(4)
    assert m.device.type == "cpu" and m.dtype == torch.bool
    assert torch.equal(m, torch.triu(torch.ones(4, 4), diagonal=1).bool())
    w = utils.get_sliding_window_causal_mask(5, 5, (2, 0))
    # row i may attend to keys i-2..i (True = masked)
    allowed = [[i - 2 <= j <= i for j in range(5)] for i in range(5)]
    assert torch.equal(~w, torch.tensor(allowed))


def test_eager_swiglu_runs_the_uncompiled_fused_functions():
    """Megatron-Core's fused SwiGLU functions are its own, uncompiled; their autograd functions
    match the explicit formula silu(a) * b (weighted: times the probabilities) in fp64 to 1e-12
    (the same ops, ordered differently in backward)."""
    import torch.nn.functional as F
    from megatron.core.fusions import fused_bias_swiglu as fused

    for name in ("swiglu", "swiglu_back", "weighted_swiglu", "weighted_swiglu_back"):
        assert not hasattr(getattr(fused, name), "_torchdynamo_orig_callable"), name
    x = torch.randn(6, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(18, 1, dtype=torch.float64, requires_grad=True)
    a, b = x.chunk(2, -1)
    for got, ref, inputs in (
        (fused.bias_swiglu_impl(x, None), F.silu(a) * b, (x,)),
        (
            fused.weighted_bias_swiglu_impl(x.view(18, 8), None, w),
            F.silu(a).reshape(18, 4) * b.reshape(18, 4) * w,
            (x, w),
        ),
    ):
        got = got.reshape(ref.shape)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
        g = torch.randn_like(ref)
        for dg, dr in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(ref, inputs, g)):
            torch.testing.assert_close(dg, dr, rtol=0, atol=1e-12)
