"""Activation estimate vs measured peak on CPU: `pytest tests/planning/test_activations.py`.

How the peak is measured: one rank builds the tiny model (Megatron-Core, local spec, fp32, as
`kat train` on CPU) and runs one forward and backward of one micro-batch (b = 2) under a
`TorchDispatchMode` that records every storage an aten op creates and watches it with a weak
reference; the peak of the live bytes over the pass is the measurement. Parameters, their
pre-allocated `.grad` (backward accumulates into it in place, as DDP's main_grad) and the inputs
are excluded; Megatron's global memory buffer is reset first, so the attention-score buffer it
keeps counts, as it does in a fresh run. The estimate is `activation_memory` for the same
shape with backend `local` and one micro-batch in flight, with Megatron-Core's fused SwiGLU
(`model.swiglu_fusion`, the default: 3f saved per token) and without it (5f; experts 6f).

Tolerance 30% (the issue's): the estimate counts what autograd saves op by op (exact at the
end of the forward pass, about 0.1% apart on these models) plus a modelled backward transient;
the measured error is within 7% (see docs/scaling.md). The two sequence lengths move the s^2
attention term from a quarter of the total to a third.
"""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kat_megatron.config.presets import get_preset
from kat_megatron.config.schema import ModelConfig, ParallelConfig
from kat_megatron.planning.activations import ActivationOptions, activation_memory, in_flight
from kat_megatron.planning.layout import Layout

MICRO_BATCH = 2
TOLERANCE = 0.30
SAVED_TOLERANCE = 0.01


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created by aten ops while active (freed ones drop out)."""

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore = ignore
        self.live: dict[int, tuple[int, StorageWeakRef]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (_, ref) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[0]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s.data_ptr()
                if key not in self.ignore and key not in self.live and s.nbytes():
                    self.live[key] = (s.nbytes(), StorageWeakRef(s))
                    self.current += s.nbytes()
        self.peak = max(self.peak, self.current)
        return out


@pytest.fixture(scope="module")
def one_rank():
    from kat_megatron.parallel.init import initialize, shutdown

    initialize(ParallelConfig(), seed=0)
    yield
    shutdown()


def measure_peak(model_cfg: ModelConfig, seq: int) -> tuple[int, int]:
    """(peak activation bytes of one forward + backward, bytes autograd saved in the forward)."""
    from megatron.core import parallel_state as ps

    from kat_megatron.models.builder import build_model, transformer_config

    ps.destroy_global_memory_buffer()
    ps._set_global_memory_buffer()
    par = ParallelConfig()
    config = transformer_config(model_cfg, par, "fp32", calculate_per_token_loss=True)
    model = build_model(model_cfg, par, "fp32", config=config)[0]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    tokens = torch.randint(0, model_cfg.vocab_size, (MICRO_BATCH, seq))
    pos = torch.arange(seq).expand(MICRO_BATCH, seq)
    held = [*model.parameters(), *(p.grad for p in model.parameters()), *model.buffers()]
    mode = LiveBytes({t.untyped_storage().data_ptr() for t in [*held, tokens, pos]})
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in mode.ignore:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, pos, None, labels=tokens)
        loss.sum().backward()
    return mode.peak, sum(saved.values())


@pytest.mark.parametrize("fusion", [True, False], ids=["fused_swiglu", "unfused_swiglu"])
@pytest.mark.parametrize("attention", ["sdpa", "unfused"])
@pytest.mark.parametrize("seq", [256, 1024])
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_activation_estimate_within_30_percent(one_rank, preset, seq, attention, fusion):
    model = ModelConfig(**get_preset(preset), attention=attention, swiglu_fusion=fusion)
    peak, saved = measure_peak(model, seq)
    opts = ActivationOptions(seq_len=seq, micro_batch=MICRO_BATCH, act_bytes=4, backend="local")
    est = activation_memory(model, Layout(), 0, 1, opts)
    err = est.total / peak - 1
    saved_err = (est.layers + est.logits) / saved - 1
    print(f"{preset} seq {seq} {attention} fusion={fusion}: measured peak {peak / 2**20:.2f} MiB, estimate "
          f"{est.total / 2**20:.2f} MiB, error {err:+.1%}; saved for backward "
          f"{saved / 2**20:.2f} MiB, estimate {saved_err:+.2%}")  # fmt: skip
    assert abs(err) <= TOLERANCE
    assert abs(saved_err) <= SAVED_TOLERANCE


@pytest.mark.parametrize("pp,vpp", [(2, None), (4, None), (2, 2), (4, 3)])
def test_in_flight_matches_megatron_schedule(pp, vpp):
    """Held chunk forwards = Megatron-Core's warm-up micro-batches + 1 (capped by the total)."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    for rank in range(pp):
        for m in (pp, 2 * pp, 8 * pp):
            comm = SimpleNamespace(
                pp_group=SimpleNamespace(size=lambda: pp, rank=lambda r=rank: r),
                virtual_pipeline_model_parallel_size=vpp,
            )
            total, all_warm, warmup, _ = get_pp_rank_microbatches(
                m, vpp or 1, pp, p2p_communicator=comm
            )
            expected = total if all_warm else warmup + 1
            assert in_flight(Layout(pp=pp, vpp=vpp), rank, m) == expected, (rank, m)
