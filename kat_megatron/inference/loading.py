"""Build a rollout engine from a kat checkpoint: `engine_from_checkpoint(DIR, tp=N)`.

`python -c "from kat_megatron.inference.loading import engine_from_checkpoint as e; print(e(
'runs/tiny_pretrain/checkpoints')[0].describe())"` loads the newest checkpoint on one rank.

The checkpoint's run config comes from its `kat_meta.json` (written by `kat train` and
`kat convert`); the model is built at the requested tensor parallelism with pp = 1 and without
sequence parallelism, and `dist_checkpointing` reshards the saved weights to that layout (a
checkpoint saved at TP=2 x PP=2 loads at TP=1 and the reverse). Run under torchrun with
WORLD_SIZE = tp (or a multiple of it: the other replicas generate independently) or as one
process for tp = 1.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import yaml

from kat_megatron.config import KatConfig, load_config
from kat_megatron.config.schema import DataConfig, ModelConfig, ParallelConfig, TrainingConfig

log = logging.getLogger("kat")


def read_checkpoint_config(ckpt_dir: str | Path) -> tuple[Path, KatConfig]:
    """(checkpoint directory, its run config). `ckpt_dir` is one checkpoint (`iter_N/`) or a
    directory of them (the newest complete one is taken)."""
    from kat_megatron.training.checkpoint_meta import read_meta, resolve_checkpoint

    path = resolve_checkpoint(ckpt_dir)
    raw = read_meta(path)["config"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "config.yaml"
        cfg_file.write_text(yaml.safe_dump(raw))
        try:
            return path, load_config(cfg_file)
        except ValueError as err:  # a config of an older kat: keep what inference needs
            log.warning("%s: run config does not load (%s); using its model section only",
                        path, err)  # fmt: skip
    data = raw.get("data", {})
    cfg = KatConfig(
        model=ModelConfig(**raw["model"]),
        training=TrainingConfig(precision=raw.get("training", {}).get("precision", "auto")),
        data=DataConfig(tokenizer=data.get("tokenizer", "tiny")),
    )
    return path, cfg


def inference_parallel(model: ModelConfig | None, tp: int, dist_backend: str = "auto"):
    """The layout rollouts run at: `tp`, pp = 1, no sequence parallelism (an MoE model at
    tp > 1 keeps it, as its layer spec requires; the engine then needs ep > 1)."""
    sp = bool(model is not None and model.is_moe and tp > 1)
    return ParallelConfig(tp=tp, sequence_parallel=sp, dist_backend=dist_backend)


def init_inference(tp: int = 1, seed: int = 0, model: ModelConfig | None = None) -> ParallelConfig:
    """torch.distributed (from torchrun/SLURM variables, or one local rank) and Megatron-Core's
    model-parallel groups for inference at `tp` (pp = 1), via `parallel.init.initialize`."""
    from kat_megatron.parallel.init import initialize

    parallel = inference_parallel(model, tp)
    initialize(parallel, seed, model)
    return parallel


def engine_from_checkpoint(
    ckpt_dir: str | Path,
    *,
    tp: int = 1,
    max_batch_size: int = 64,
    max_sequence_length: int | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
):
    """(RolloutEngine, tokenizer, KatConfig) for checkpoint `ckpt_dir` at tensor parallelism `tp`.

    Initialises torch.distributed and Megatron-Core's groups (`init_inference`); every rank of
    the job calls it. `max_sequence_length` defaults to the model's max_position_embeddings;
    `tokenizer` overrides the run's `data.tokenizer`.
    """
    from kat_megatron.data.tokenizer import load_tokenizer
    from kat_megatron.inference.engine import RolloutEngine
    from kat_megatron.models.builder import resolve_dtype
    from kat_megatron.training.checkpointing import load_frozen_model

    path, cfg = read_checkpoint_config(ckpt_dir)
    parallel = init_inference(tp, seed, cfg.model)
    cfg = dataclasses.replace(cfg, parallel=parallel)
    precision = cfg.training.precision
    model = load_frozen_model(path, cfg.model, parallel, precision)
    tok = load_tokenizer(tokenizer or cfg.data.tokenizer)
    length = max_sequence_length or cfg.model.max_position_embeddings
    engine = RolloutEngine(
        model[0],
        tok,
        max_sequence_length=length,
        max_batch_size=max_batch_size,
        params_dtype=resolve_dtype(precision),
        model_config=cfg.model,
        seed=seed,
    )
    log.info("rollout engine: %s at tp=%d (max_sequence_length=%d, max_batch_size=%d)",
             path, tp, length, max_batch_size)  # fmt: skip
    return engine, tok, cfg
