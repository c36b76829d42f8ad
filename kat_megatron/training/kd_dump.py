"""A teacher's top-K over stage kd's samples, on disk: `kat kd dump-teacher ...`.

    kat kd dump-teacher --ckpt runs/teacher/checkpoints --config examples/tiny_kd/config.yaml \
        --topk 64 --out runs/tiny_kd/teacher_topk --nproc 2
    kat kd dump-teacher --ckpt DIR --data PREFIX --num-samples 640 --topk 64 --out DIR

Builds the Megatron GPT train dataset exactly as stage kd does (same data, seed, split,
sequence length and sample count: `training.steps * training.global_batch_size`), runs the
teacher (architecture from its checkpoint's `kat_meta.json`) over samples 0..N-1 and writes, per
position, its top-K token ids, log-probs at `temperature` and the log of the remaining mass with
`data/teacher_topk.py`'s `TeacherTopKWriter`. The dump records the dataset's identity
(`kd_teacher.data_description`), the tokenizer fingerprint and a hash of every sample's tokens,
so a KD run over other samples, another order or another tokenizer fails loudly.

Ranks: TP shards the teacher over the vocabulary (`vocab_parallel_topk`, nothing gathered); the
data-parallel ranks take contiguous slices of the samples, each writes a part, and rank 0 joins
the parts in order (`merge_teacher_topk`). Every directory is published atomically.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kat_megatron.config.schema import DataConfig, KDTeacherConfig, ParallelConfig

log = logging.getLogger("kat")


@dataclass
class DumpSpec:
    """What to dump; every field has the meaning of the `kat kd dump-teacher` flag."""

    ckpt: str
    data: DataConfig
    num_samples: int
    out: str
    topk: int
    seed: int = 1234
    temperature: float = 1.0
    tp: int = 1
    micro_batch_size: int = 4
    logprob_dtype: str = "float16"
    precision: str = "auto"
    cache_dir: str | None = None
    overwrite: bool = False
    rows_per_shard: int = 1024
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_samples", "topk", "tp", "micro_batch_size", "rows_per_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value!r}: expected an integer >= 1")
        if not self.temperature > 0:
            raise ValueError(f"--temperature={self.temperature}: expected > 0")
        if self.logprob_dtype not in ("float16", "float32"):
            raise ValueError(f"--logprob-dtype={self.logprob_dtype!r}: float16 or float32")
        if Path(self.out).exists() and not self.overwrite:
            raise ValueError(f"--out {self.out} exists (pass --overwrite to replace it)")


def _slice(num_samples: int, dp_rank: int, dp: int) -> range:
    per = -(-num_samples // dp)
    return range(dp_rank * per, min(num_samples, (dp_rank + 1) * per))


def _dump_meta(spec: DumpSpec, train, model_cfg, ckpt: Path):
    """The dump's header: shapes, tau, the tokenizer and the dataset's identity."""
    from kat_megatron.data.teacher_topk import TeacherTopKMeta
    from kat_megatron.training.kd_teacher import data_description, data_fingerprint

    tokenizer = train.config.tokenizer
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {spec.data.tokenizer!r} has {tokenizer.vocab_size} tokens, more than the "
            f"teacher's vocab_size={model_cfg.vocab_size}"
        )
    description = data_description(train)
    return TeacherTopKMeta(
        seq_length=spec.data.seq_length,
        topk=spec.topk,
        vocab_size=model_cfg.vocab_size,
        temperature=spec.temperature,
        tokenizer_fingerprint=tokenizer.fingerprint,
        data_fingerprint=data_fingerprint(description),
        logprob_dtype=spec.logprob_dtype,
        extra={"data": description, "teacher_ckpt": str(ckpt), **spec.extra},
    )


def _write_rows(spec: DumpSpec, chunk, train, rows: range, writer, vocab_size: int) -> None:
    """Teacher top-K of samples `rows`, micro-batch by micro-batch (`writer` None: TP rank > 0)."""
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from kat_megatron.losses.vocab_parallel import vocab_parallel_topk
    from kat_megatron.models.forward import model_heads
    from kat_megatron.training.batches import collate
    from kat_megatron.training.kd_teacher import to_device, tp_group

    starts = range(rows.start, rows.stop, spec.micro_batch_size)
    quiet = dist.get_rank() != 0
    for start in tqdm(starts, desc="teacher top-k", unit="batch", mininterval=1.0, disable=quiet):
        idx = list(range(start, min(rows.stop, start + spec.micro_batch_size)))
        batch = to_device(collate([train[i] for i in idx]))
        with torch.no_grad():
            _, heads = model_heads(chunk, batch, max_heads=1)
        s, b, _ = heads[0].shape
        ids, lq, res = vocab_parallel_topk(
            heads[0].reshape(s * b, -1), spec.topk, spec.temperature, vocab_size, tp_group()
        )
        if writer is not None:
            writer.write(
                idx,
                batch["tokens"],
                ids.view(s, b, -1).transpose(0, 1),
                lq.view(s, b, -1).transpose(0, 1),
                res.view(s, b).t(),
            )


def dump_teacher(spec: DumpSpec) -> Path:
    """Write the dump (every rank calls this; it initialises torch.distributed itself)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from kat_megatron.data.gpt_data import build_gpt_datasets
    from kat_megatron.data.teacher_topk import TeacherTopKWriter, merge_teacher_topk
    from kat_megatron.parallel.init import initialize
    from kat_megatron.training.checkpoint_meta import read_meta, resolve_checkpoint
    from kat_megatron.training.checkpointing import load_frozen_model
    from kat_megatron.training.kd_teacher import teacher_model_config

    path = resolve_checkpoint(spec.ckpt)
    model_cfg = teacher_model_config(KDTeacherConfig(ckpt=str(path)), read_meta(path))
    if spec.topk > model_cfg.vocab_size:
        raise ValueError(
            f"--topk={spec.topk} exceeds the teacher's vocab_size {model_cfg.vocab_size}"
        )
    if spec.data.seq_length > model_cfg.max_position_embeddings:
        raise ValueError(
            f"--seq-length={spec.data.seq_length} exceeds the teacher's "
            f"max_position_embeddings={model_cfg.max_position_embeddings}"
        )
    parallel = ParallelConfig(tp=spec.tp)
    dp = initialize(parallel, spec.seed, model_cfg)
    chunk = load_frozen_model(path, model_cfg, parallel, spec.precision)[0]
    train, _, _ = build_gpt_datasets(
        spec.data, spec.data.seq_length, spec.seed, (spec.num_samples, 1, 1),
        cache_dir=spec.cache_dir, create_attention_mask=False,
    )  # fmt: skip
    meta = _dump_meta(spec, train, model_cfg, path)
    out = Path(spec.out)
    parts = out.with_name(f".{out.name}.parts")
    if dist.get_rank() == 0 and dp > 1:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
    dist.barrier()
    dp_rank = parallel_state.get_data_parallel_rank()
    writer = None
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        target = out if dp == 1 else parts / f"part-{dp_rank:05d}"
        writer = TeacherTopKWriter(target, meta, spec.rows_per_shard, spec.overwrite)
    try:
        rows = _slice(spec.num_samples, dp_rank, dp)
        _write_rows(spec, chunk, train, rows, writer, model_cfg.vocab_size)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    dist.barrier()
    if dp > 1 and dist.get_rank() == 0:
        merge_teacher_topk([parts / f"part-{r:05d}" for r in range(dp)], out, spec.overwrite)
        shutil.rmtree(parts, ignore_errors=True)
    dist.barrier()
    log.info("wrote teacher top-%d of %d samples to %s", spec.topk, spec.num_samples, out)
    return out
