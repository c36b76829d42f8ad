"""Fused SwiGLU (`model.swiglu_fusion`) against the unfused path: `pytest tests/models/test_swiglu_fusion.py`.

- Training parity: one rank saves tiny-dense / tiny-moe initial weights (training.steps=0); the
  fused (default) and unfused runs then train 6 steps from them on the same batches with
  `kat train`. Per-step losses must agree within 1e-6 absolute (losses are ~6.2, so ~1.6e-7
  relative). Why 1e-6: everything is fp32; the fused function's forward is the same silu(a) * b,
  only its hand-written backward orders the products differently, so the gradients differ by a
  few fp32 ulps and six Adam steps carry that to ~1e-7 in the loss. A wrong gradient (a missing
  gate term, a dropped routing probability) moves the loss by 1e-3 within a step.
- Activation memory of the MLP block (the dense MLP and the MoE layer of one decoder layer):
  bytes autograd saves for backward, fused and unfused, must equal the walk in
  `kat_megatron/planning/activations.py` exactly (dense: 3f vs 5f per token; experts: 3f vs
  6f per routed token), and the peak of a forward + backward of the block is printed beside it.
- The compiled kernels GPUs run (`torch.compile` from `megatron.core.jit`, without kat's CPU
  adaptation) match the explicit formula in a fresh process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from kat_megatron.config.presets import get_preset
from kat_megatron.config.schema import ModelConfig, ParallelConfig

STEPS = 6
LOSS_TOL = 1e-6
TOKENS = 2 * 128  # micro-batch 2, sequence 128

pytestmark = pytest.mark.timeout(900)


def _config(tmp_path, corpus):
    import yaml

    cfg = {
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1},
        "training": {"steps": STEPS, "micro_batch_size": 2, "global_batch_size": 4},
        "data": {"paths": [str(corpus)], "seq_length": 32, "cache_dir": str(tmp_path / "cache")},
        "logging": {"tensorboard": False},
        "checkpoint": {"save": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_fused_training_matches_unfused(tmp_path, tiny_corpus, kat, metrics, preset):
    from kat_megatron.training.checkpoint_meta import latest_checkpoint

    config = _config(tmp_path, tiny_corpus)
    model = [f"model.preset={preset}"]
    init_dir = tmp_path / "init"
    kat(["train", str(config), *model, "training.steps=0", "checkpoint.save=true",
         f"run.dir={init_dir}"])  # fmt: skip
    init = latest_checkpoint(init_dir / "checkpoints")
    losses = {}
    for fused in (True, False):
        run = tmp_path / f"fused_{fused}"
        kat(["train", str(config), *model, f"model.swiglu_fusion={str(fused).lower()}",
             f"checkpoint.load={init}", f"run.dir={run}"])  # fmt: skip
        losses[fused] = torch.tensor([r["loss"] for r in metrics(run)], dtype=torch.float64)
    assert len(losses[True]) == len(losses[False]) == STEPS
    diff = (losses[True] - losses[False]).abs().max().item()
    print(f"{preset}: fused vs unfused, max |loss difference| over {STEPS} steps = {diff:.2e}")
    assert diff <= LOSS_TOL, (losses[True].tolist(), losses[False].tolist())
    assert losses[True][-1] < losses[True][0] - 0.05  # it trained: not two flat lines


@pytest.fixture(scope="module")
def one_rank():
    from kat_megatron.parallel.init import initialize, shutdown

    initialize(ParallelConfig(), seed=0)
    yield
    shutdown()


def _measure_mlp(model_cfg: ModelConfig) -> tuple[int, int]:
    """(bytes saved for backward, peak live bytes of forward + backward) of layer 0's MLP."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "planning"))
    from test_activations import LiveBytes  # the activation test's allocation tracker

    from kat_megatron.models.builder import build_model, transformer_config

    config = transformer_config(model_cfg, ParallelConfig(), "fp32")
    torch.manual_seed(0)
    mlp = build_model(model_cfg, ParallelConfig(), "fp32", config=config)[0].decoder.layers[0].mlp
    x = torch.randn(TOKENS // 2, 2, model_cfg.hidden_size, requires_grad=True)
    ignore = {t.untyped_storage().data_ptr() for t in [x, *mlp.parameters(), *mlp.buffers()]}
    mode = LiveBytes(ignore)
    saved: dict[int, tuple[int, StorageWeakRef]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        key = s.data_ptr()
        if key not in ignore and (key not in saved or saved[key][1].expired()):
            saved[key] = (s.nbytes(), StorageWeakRef(s))
        return t

    with mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, _ = mlp(x)
        # what is still held when backward starts (a dropped graph branch frees its tensors)
        held = sum(n for n, ref in saved.values() if not ref.expired())
        out.sum().backward()
    return held, mode.peak


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_fused_mlp_saves_the_planned_activations(one_rank, preset):
    from kat_megatron.planning.activations import ActivationOptions, layer_terms
    from kat_megatron.planning.layout import Layout

    opts = ActivationOptions(seq_len=TOKENS // 2, micro_batch=2, act_bytes=4, backend="local")
    got, planned = {}, {}
    for fused in (True, False):
        model = ModelConfig(**get_preset(preset), swiglu_fusion=fused)
        got[fused] = _measure_mlp(model)
        terms = layer_terms(model, Layout(), opts, model.is_moe)
        planned[fused] = terms.get("mlp", 0.0) + terms.get("experts", 0.0)
        if model.is_moe:
            planned[fused] += terms["router"] + terms.get("shared_expert", 0.0)
    (s1, p1), (s0, p0) = got[True], got[False]
    print(f"{preset} MLP block, {TOKENS} tokens: saved for backward fused {s1 / 2**10:.0f} KiB, "
          f"unfused {s0 / 2**10:.0f} KiB (ratio {s1 / s0:.3f}); peak fused {p1 / 2**10:.0f} KiB, "
          f"unfused {p0 / 2**10:.0f} KiB (ratio {p1 / p0:.3f})")  # fmt: skip
    model = ModelConfig(**get_preset(preset))
    if model.is_moe:
        # The router's saved tensors depend on the routing (top-k indices, dispatch maps), so
        # compare the activation difference exactly: 3 f_e-wide tensors per routed token, and
        # 2 shared-expert-wide ones per token.
        routed = TOKENS * model.moe_router_topk
        ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
        shared = model.moe_shared_expert_intermediate_size or 0
        assert s0 - s1 == (routed * ffn * 3 + TOKENS * shared * 2) * 4
        assert planned[False] - planned[True] == s0 - s1
    else:  # the whole block: FC1 output (2f) + FC2 input (f) fused, + silu, gate input unfused
        assert s1 == planned[True] == TOKENS * model.ffn_hidden_size * 3 * 4
        assert s0 == planned[False] == TOKENS * model.ffn_hidden_size * 5 * 4
    if model.is_moe:  # dense: the peak is in backward, where CPU's eager swiglu_back's
        assert p1 < p0  # temporaries offset the smaller saved set (compiled kernels fuse them)


COMPILED = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from megatron.core.fusions import fused_bias_swiglu as fused
    assert hasattr(fused.swiglu, "_torchdynamo_orig_callable")  # compiled, as on GPUs
    torch.manual_seed(0)
    x = torch.randn(64, 2, 32, requires_grad=True)
    w = torch.rand(128, 1, requires_grad=True)
    a, b = x.chunk(2, -1)
    worst = 0.0
    for got, ref, inputs in (
        (fused.bias_swiglu_impl(x, None), F.silu(a) * b, (x,)),
        (fused.weighted_bias_swiglu_impl(x.view(128, 32), None, w).view(64, 2, 16),
         F.silu(a) * b * w.view(64, 2, 1), (x, w)),
    ):
        g = torch.randn_like(ref)
        pairs = [(got, ref), *zip(torch.autograd.grad(got, inputs, g),
                                  torch.autograd.grad(ref, inputs, g))]
        for u, v in pairs:
            worst = max(worst, ((u - v).abs().max() / v.abs().max()).item())
    print("worst relative difference", worst)
    assert worst <= 1e-6, worst
    """
)


def test_compiled_fused_kernels_match_formula():
    """fp32, relative to the largest element: 1e-6 allows the compiler's reassociation (a few
    ulps) and nothing else."""
    proc = subprocess.run(
        [sys.executable, "-c", COMPILED], capture_output=True, text=True, timeout=600
    )
    print(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
