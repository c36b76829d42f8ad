"""CPU adaptation layer: lets unmodified Megatron-Core 0.16.1 training paths run on gloo CPU ranks.

Applied by `kat_megatron.parallel.init.initialize()` (e.g. `kat train cfg.yaml --nproc 2`) only
when CUDA is unavailable; on GPUs nothing here runs. Megatron-Core calls CUDA directly in many
places; each adaptation below is one named patch, gated on the pinned Megatron-Core version and
covered by `tests/parallel/test_cpu_adapter.py`:

- `device_mode`: a `TorchFunctionMode` that maps CUDA device arguments of tensor factories and
  `Tensor.to/.cuda` to the CPU, and reports `Tensor.type()` under its CUDA name (the optimizers
  check `param.type() == 'torch.cuda.FloatTensor'`).
- `cuda_runtime`: `torch.cuda.current_device/synchronize/streams/events/memory stats` become
  CPU no-ops (a CPU process never has CUDA, so this cannot alter a GPU run).
- `rng`: the model-parallel RNG tracker keeps CPU generator states instead of CUDA ones.
- `alltoall_splits`: gloo's `all_to_all_single` needs split sizes as Python lists (MoE dispatch
  passes tensors).
- `te_general_gemm`: Megatron-Core 0.16.1's router references `te_general_gemm` without TE.
- `causal_masks`: the default causal and sliding-window masks are built with `device="cuda"`;
  activation recomputation reruns attention inside an autograd Function, where torch does not
  apply function modes, so `device_mode` cannot catch these two.
- `eager_swiglu`: the fused SwiGLU's kernels (`fusions/fused_bias_swiglu.py`, wrapped in
  `torch.compile` by `megatron.core.jit`) run as the plain torch functions they wrap. Its
  autograd functions, and so what they save for backward, are unchanged; inductor's C++ build
  would cost each CPU process ~7-25 s for no gain at tiny sizes (`model.swiglu_fusion`).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.overrides import TorchFunctionMode

from kat_megatron.parallel.mcore_version import SUPPORTED_MCORE, installed_mcore

log = logging.getLogger(__name__)

_APPLIED: list[str] = []
_MODE: TorchFunctionMode | None = None

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function called under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func in (torch.Tensor.to, torch.Tensor.new_empty) and args:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args))
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for `torch.cuda.Stream`: CPU work is synchronous."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, *args, **kwargs) -> _NullEvent:
        return _NullEvent()

    def synchronize(self) -> None:
        pass


class _NullEvent:
    """Stands in for `torch.cuda.Event`."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _patch_device_mode() -> None:
    global _MODE
    _MODE = CpuDeviceMode()
    _MODE.__enter__()


def _patch_cuda_runtime() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_device = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    # CudaRNGStatesTracker.add and model_parallel_cuda_manual_seed call these directly.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # `torch.manual_seed` itself calls `torch.cuda.manual_seed_all`: seed the CPU generator
    # directly, and let manual_seed_all be a no-op (the CPU generator is already seeded).
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state_all = lambda: [torch.get_rng_state()]
    torch.cuda.set_rng_state_all = lambda states: torch.set_rng_state(states[0])


def _as_list(sizes):
    if isinstance(sizes, torch.Tensor):
        return sizes.tolist()
    return sizes


def _patch_alltoall_splits() -> None:
    dist = torch.distributed
    original = dist.all_to_all_single
    if getattr(original, "_kat_cpu", False):
        return

    @functools.wraps(original)
    def all_to_all_single(
        output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        return original(
            output,
            input,
            _as_list(output_split_sizes),
            _as_list(input_split_sizes),
            group=group,
            async_op=async_op,
        )

    all_to_all_single._kat_cpu = True
    dist.all_to_all_single = all_to_all_single


def _patch_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_causal_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    def default_causal_mask(sq: int) -> torch.Tensor:  # uncached, as Megatron-Core's
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    def sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
        m = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])  # as Megatron-Core's

    for mod in (utils, fused_softmax):
        mod.get_default_causal_mask = default_causal_mask
        mod.get_sliding_window_causal_mask = sliding_window_causal_mask


def _patch_eager_swiglu() -> None:
    from megatron.core.fusions import fused_bias_swiglu as fused

    names = ("swiglu", "bias_swiglu", "weighted_swiglu")
    for name in (*names, *(n + "_back" for n in names)):
        fn = getattr(fused, name)
        setattr(fused, name, getattr(fn, "_torchdynamo_orig_callable", fn))


PATCHES = {
    "device_mode": _patch_device_mode,
    "cuda_runtime": _patch_cuda_runtime,
    "rng": _patch_rng,
    "alltoall_splits": _patch_alltoall_splits,
    "te_general_gemm": _patch_te_general_gemm,
    "causal_masks": _patch_causal_masks,
    "eager_swiglu": _patch_eager_swiglu,
}


def apply() -> list[str]:
    """Apply every patch once (idempotent). Refuses on CUDA machines and other Megatron-Cores."""
    if _APPLIED:
        return list(_APPLIED)
    if torch.cuda.is_available():
        raise RuntimeError("the CPU adaptation layer must not be applied where CUDA is available")
    version = installed_mcore()
    if version != SUPPORTED_MCORE:
        raise RuntimeError(
            f"kat's CPU adaptation layer is written for megatron-core=={SUPPORTED_MCORE}, "
            f"found {version}; pin megatron-core=={SUPPORTED_MCORE} for CPU runs"
        )
    for name, patch in PATCHES.items():
        patch()
        _APPLIED.append(name)
    log.debug("CPU adaptation applied: %s", ", ".join(_APPLIED))
    return list(_APPLIED)


def applied() -> list[str]:
    """Names of the patches in force in this process."""
    return list(_APPLIED)
