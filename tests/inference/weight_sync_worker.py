"""Layouts worker for tests/inference/test_weight_sync_layouts.py (real gloo ranks):

    python -m kat_megatron.launch.ranks --nproc-per-node 4 \
        tests/inference/weight_sync_worker.py OUT_DIR

One launch runs every layout of `LAYOUTS` in turn: initialise Megatron-Core's groups for it,
build the tiny model (random init: every shard differs), save it as a kat checkpoint
OUT_DIR/<layout>/ckpt (`save_checkpoint`, step 0, model only), then run the refit gather
(`iter_hf_tensors`) and save OUT_DIR/<layout>/rank{R}.pt: {"owner": is_refit_owner(),
"tp_rank", "pp_rank", "names": the HF names in yield order, "tensors": {name: tensor} on owners}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

LAYOUTS: dict[str, tuple[dict, dict]] = {
    # (ModelConfig fields over the preset, ParallelConfig fields); 4 ranks each
    "tp2_pp2": (dict(preset="tiny-dense"), dict(tp=2, pp=2)),
    # uneven split (1 + 3 layers) and tied embeddings: the last stage's output-layer copy of
    # the embedding must not be sent; dp=2: two owners
    "pp2_uneven_tied": (
        dict(preset="tiny-dense", untie_embeddings_and_output_weights=False),
        dict(pp=2, first_stage_layers=1),
    ),
    "pp2_vpp2": (dict(preset="tiny-dense"), dict(pp=2, vpp=2)),  # 4 chunks of one layer
    # an MTP depth: skipped, as is the copy of the embedding it keeps on the last stage
    "pp2_mtp": (dict(preset="tiny-dense", mtp_num_layers=1), dict(pp=2)),
    # Qwen3-MoE export (8 experts, 3 layers): dp=4, 4 local experts per rank
    "ep2": (dict(preset="tiny-qwen3-moe"), dict(ep=2)),
    "tp2_ep2": (dict(preset="tiny-qwen3-moe"), dict(tp=2, ep=2)),  # experts split over ETP=2 too
    "ep2_pp2": (dict(preset="tiny-qwen3-moe"), dict(ep=2, pp=2, first_stage_layers=1)),
}


def run_layout(name: str, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from kat_megatron.config.loader import config_to_dict
    from kat_megatron.config.presets import get_preset
    from kat_megatron.config.schema import KatConfig, ModelConfig, ParallelConfig
    from kat_megatron.inference.weight_sync import is_refit_owner, iter_hf_tensors
    from kat_megatron.models.builder import build_model
    from kat_megatron.parallel.init import initialize
    from kat_megatron.training.checkpointing import save_checkpoint

    model_kw, parallel_kw = LAYOUTS[name]
    model_cfg = ModelConfig(**{**get_preset(model_kw["preset"]), **model_kw})
    parallel = ParallelConfig(**parallel_kw)
    initialize(parallel, 1234, model_cfg)
    chunks = build_model(model_cfg, parallel, "fp32")
    d = out / name
    extra = {"config": config_to_dict(KatConfig(model=model_cfg, parallel=parallel))}
    save_checkpoint(d / "ckpt", 0, chunks, None, None, extra)
    start = time.perf_counter()
    owner = is_refit_owner()
    names, tensors = [], {}
    # a list of chunks under VPP, else the single module (both forms are accepted)
    model = chunks if len(chunks) > 1 else chunks[0]
    for key, tensor in iter_hf_tensors(model, model_cfg):
        names.append(key)
        if owner:
            tensors[key] = tensor
    res = {
        "owner": owner,
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "names": names,
        "tensors": tensors,
        "seconds": time.perf_counter() - start,
    }
    torch.save(res, d / f"rank{dist.get_rank()}.pt")
    dist.barrier()


def main(out: str) -> None:
    from kat_megatron.parallel.init import shutdown

    for name in LAYOUTS:
        run_layout(name, Path(out))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
