"""Measure static memory of real Megatron-Core ranks (run by tests/planning/test_static_memory.py):

    python -m torch.distributed.run --nproc-per-node 4 tests/planning/measure_static.py \
        --out DIR CASE [CASE ...]

For each CASE (a name in `CASES`: model preset, precision and layout overrides) every rank builds
the model, Megatron-Core DDP and the (distributed) optimizer through `Trainer`, takes one
training step on random tokens (torch's Adam creates its moments lazily, on the first step), then
writes `DIR/CASE.rank<R>.json` with what it actually holds: unique parameter storages, DDP grad
buffers, fp32 main parameters and Adam moments, plus the ranks the estimate needs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
BASE = [
    "training.steps=1",
    "training.micro_batch_size=1",
    "training.global_batch_size=4",
    "data.seq_length=16",
    "checkpoint.save=false",
    "logging.tensorboard=false",
]
# name -> overrides; all run on 4 ranks. Together they cover TP (with SP), PP with virtual
# stages, DP with and without the distributed optimizer, EP (ETP = TP and ETP = 1), bf16 with
# fp32 main copies (and bf16 gradient buffers: optimizer.grad_reduce_dtype), fp32, MTP heads (an embedding copy on the last stage) and tied embeddings
# across stages (`shared_embedding` buckets), and the bucketing code path of overlapped reduce.
CASES: dict[str, list[str]] = {
    "dense_tp2_dp2_bf16": ["model.preset=tiny-dense", "parallel.tp=2", "training.precision=bf16"],
    "dense_pp2_vpp2_dp2": ["model.preset=tiny-dense", "parallel.pp=2", "parallel.vpp=2"],
    "dense_dp4_bf16_nodistopt": [
        "model.preset=tiny-dense",
        "training.precision=bf16",
        "parallel.use_distributed_optimizer=false",
    ],
    "dense_pp2_tied_overlap_bf16": [
        "model.preset=tiny-dense",
        "model.untie_embeddings_and_output_weights=false",
        "parallel.pp=2",
        "parallel.overlap_grad_reduce=true",
        "training.precision=bf16",
    ],
    "moe_ep2_dp2_bf16": ["model.preset=tiny-moe", "parallel.ep=2", "training.precision=bf16"],
    "moe_ep2_dp2_bf16_bf16grads": [
        "model.preset=tiny-moe",
        "parallel.ep=2",
        "training.precision=bf16",
        "optimizer.grad_reduce_dtype=bf16",
    ],
    "moe_tp2_ep2_etp1_dp2": [
        "model.preset=tiny-moe",
        "parallel.tp=2",
        "parallel.ep=2",
        "parallel.etp=1",
    ],
    "moe_tp2_pp2_mtp_bf16": [
        "model.preset=tiny-moe",
        "model.mtp_num_layers=1",
        "parallel.tp=2",
        "parallel.pp=2",
        "training.precision=bf16",
    ],
}


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure(trainer) -> dict:
    """What `trainer`'s rank holds after one step, in bytes."""
    from megatron.core import parallel_state as ps

    params = [p for chunk in trainer.model for p in chunk.parameters()]
    buffers = [b for chunk in trainer.model for b in chunk.buffers + chunk.expert_parallel_buffers]
    moments, main = [], []
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for state in opt.optimizer.state.values():
            moments += [v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            main += [p for group in getattr(opt, name, []) for p in group if p is not None]
    chunks = [
        [
            [
                name,
                p.numel(),
                not getattr(p, "allreduce", True),
                bool(getattr(p, "shared_embedding", 0)),
            ]
            for name, p in chunk.module.named_parameters()
        ]
        for chunk in trainer.model
    ]
    return {
        "named_params": chunks,
        "params_bytes": _storage_bytes(params),
        "grad_bytes": sum(b.grad_data.nbytes for b in buffers),
        "main_param_bytes": _storage_bytes(main),
        "moment_bytes": sum(m.nbytes for m in moments),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(with_context_parallel=True),
        "expert_dp_rank": ps.get_expert_data_parallel_rank(),
        "world_size": torch.distributed.get_world_size(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("cases", nargs="+", choices=sorted(CASES))
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from step_overhead import RandomTokens

    from kat_megatron.config import load_config
    from kat_megatron.parallel.init import shutdown
    from kat_megatron.training.loop import Trainer
    from kat_megatron.utils.logging import setup_logging

    setup_logging("WARNING")
    out = Path(args.out)
    tmp = tempfile.mkdtemp()
    for case in args.cases:
        cfg = load_config(None, [*BASE, *CASES[case], f"run.dir={tmp}/{case}"])
        data = RandomTokens(64, cfg.data.seq_length, cfg.model.vocab_size)
        trainer = Trainer(cfg, datasets=(data, None, None))
        trainer.train_step()
        row = dict(measure(trainer), case=case, overrides=CASES[case])
        rank = torch.distributed.get_rank()
        (out / f"{case}.rank{rank}.json").write_text(json.dumps(row))
        del trainer
        # Megatron-Core sizes its MoE aux-loss tracker for the first model it sees.
        get_moe_layer_wise_logging_tracker().clear()
    shutdown()


if __name__ == "__main__":
    main()
