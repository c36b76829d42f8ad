"""Student heads and teachers of `kat train` stage kd (`kat train examples/tiny_kd/config.yaml`).

- `model_heads(model, batch)` (from `models/forward.py`): the student's logits per head.
- `OnlineTeacher`: a frozen `GPTModel` (any preset, its own kat checkpoint, the student's TP
  layout) run under `torch.no_grad()` in the student's forward step.
- `OfflineTeacher`: the top-K dump of `kat kd dump-teacher` (`data/teacher_topk.py`), read for
  the student's sample indices; another tokenizer, other data or another sample order fail.
- `data_description(ds)`: what fixes a Megatron GPT dataset's sample order (Megatron-Core's own
  dataset identifiers, with the file location reduced to its name), hashed into the dump.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from kat_megatron.config.schema import (
    KatConfig,
    KDTeacherConfig,
    ModelConfig,
    check_layout,
)
from kat_megatron.data.teacher_topk import TeacherTopKMismatch, TeacherTopKReader
from kat_megatron.losses.kd import TeacherLogits, TeacherTopK
from kat_megatron.models.builder import padded_vocab_size
from kat_megatron.models.forward import model_heads
from kat_megatron.training.checkpoint_meta import read_meta, resolve_checkpoint
from kat_megatron.training.checkpointing import load_frozen_model

log = logging.getLogger("kat")


def to_device(batch: dict) -> dict:
    """The batch on the current GPU (unchanged on CPU)."""
    if not torch.cuda.is_available():
        return batch
    dev = torch.cuda.current_device()
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def teacher_model_config(teacher: KDTeacherConfig, meta: dict) -> ModelConfig:
    """The teacher's architecture: the checkpoint's recorded model (or `teacher.preset`), with
    `teacher.model` fields over it; MTP off (only the teacher's main head is a target)."""
    from kat_megatron.config import load_config

    if teacher.preset is None:
        base = [f"model.{k}={json.dumps(v)}" for k, v in meta["config"]["model"].items()]
    else:
        base = [f"model.preset={teacher.preset}"]
    extra = [f"model.{k}={json.dumps(v)}" for k, v in teacher.model.items()]
    try:
        return load_config(None, [*base, *extra, "model.mtp_num_layers=null"]).model
    except ValueError as err:
        raise ValueError(f"kd.teacher: {err}") from None


def check_teacher_fits(teacher: ModelConfig, student: ModelConfig, cfg: KatConfig) -> None:
    """The teacher's logits must be sharded like the student's: same vocabulary and padding."""
    tp = cfg.parallel.tp
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"kd.teacher: teacher vocab_size={teacher.vocab_size} but model.vocab_size="
            f"{student.vocab_size}; a teacher must share the student's tokenizer"
        )
    if padded_vocab_size(teacher, tp) != padded_vocab_size(student, tp):
        raise ValueError(
            f"kd.teacher: teacher make_vocab_size_divisible_by="
            f"{teacher.make_vocab_size_divisible_by}, student {student.make_vocab_size_divisible_by}"
            ": the padded vocabularies differ; set kd.teacher.model.make_vocab_size_divisible_by"
        )
    if cfg.data.seq_length > teacher.max_position_embeddings:
        raise ValueError(
            f"data.seq_length={cfg.data.seq_length} exceeds the teacher's "
            f"max_position_embeddings={teacher.max_position_embeddings}"
        )
    try:
        check_layout(teacher, cfg.parallel)
    except ValueError as err:
        raise ValueError(f"kd.teacher: the teacher cannot use this layout: {err}") from None


def check_teacher_tokenizer(meta: dict, data_tokenizer: str, fingerprint: str) -> None:
    """Fail when the teacher checkpoint's recorded tokenizer encodes differently from ours."""
    name = meta["config"].get("data", {}).get("tokenizer")
    if name is None or name == data_tokenizer:
        return
    from kat_megatron.data.tokenizer import MegatronTokenizerAdapter

    try:
        theirs = MegatronTokenizerAdapter.from_name(name).fingerprint
    except Exception as err:  # noqa: BLE001 - a path on another machine: cannot compare
        log.warning("kd.teacher: cannot load the teacher's tokenizer %r to compare (%s)", name, err)
        return
    if theirs != fingerprint:
        raise ValueError(
            f"kd.teacher.ckpt was trained with tokenizer {name!r}, which encodes differently "
            f"from data.tokenizer={data_tokenizer!r}"
        )


class OnlineTeacher:
    """A frozen Megatron-Core teacher run in the student's forward step (no activations kept)."""

    def __init__(self, cfg: KatConfig, tokenizer_fingerprint: str) -> None:
        teacher = cfg.kd.teacher_config()
        self.path = resolve_checkpoint(teacher.ckpt)
        meta = read_meta(self.path)
        self.model_cfg = teacher_model_config(teacher, meta)
        check_teacher_fits(self.model_cfg, cfg.model, cfg)
        check_teacher_tokenizer(meta, cfg.data.tokenizer, tokenizer_fingerprint)
        self.chunks = load_frozen_model(
            self.path, self.model_cfg, cfg.parallel, cfg.training.precision
        )
        log.info(
            "kd: online teacher %s (%d layers, hidden %d)",
            self.path,
            self.model_cfg.num_layers,
            self.model_cfg.hidden_size,
        )

    @torch.no_grad()
    def target(self, batch: dict, sample_indices: list[int]) -> TeacherLogits:
        _, heads = model_heads(self.chunks[0], batch, max_heads=1)
        return TeacherLogits(heads[0])


def data_description(dataset) -> dict:
    """Megatron-Core's identifiers of a (blended) GPT dataset: class, path, sample count, split,
    seed, sequence length, tokenizer. Paths are reduced to their file name and the tokenizer to
    its fingerprint, so that a dump made elsewhere still matches."""

    def portable(x: Any) -> Any:
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if k == "tokenizer_path":
                    continue
                out[k] = Path(v).name if k == "dataset_path" and v else portable(v)
            return out
        if isinstance(x, list):
            return [portable(v) for v in x]
        return x

    return portable(json.loads(dataset.unique_description))


def data_fingerprint(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


_DUMP_FLAGS = {
    "num_samples": "--num-samples (training.steps * training.global_batch_size)",
    "random_seed": "--seed (training.seed)",
    "sequence_length": "--seq-length (data.seq_length)",
    "split": "--split (data.split)",
    "split_matrix": "--split (data.split)",
    "dataset_path": "--data (data.paths)",
    "fingerprint": "--tokenizer (data.tokenizer)",
    "weights": "--data weights (data.paths)",
}


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _flatten(val, f"{prefix}{key}.").items()}
    if isinstance(x, list) and any(isinstance(v, (dict, list)) for v in x):
        return {k: v for i, val in enumerate(x) for k, v in _flatten(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: x}


def describe_mismatch(dumped: dict, ours: dict) -> str:
    """One line per field where the dump's data differs from this run's, with the flag to fix."""
    a, b = _flatten(dumped), _flatten(ours)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            flag = _DUMP_FLAGS.get(key.rsplit(".", 1)[-1], "")
            fix = f"  [kat kd dump-teacher {flag}]" if flag else ""
            lines.append(f"{key}: dump {a.get(key)!r}, this run {b.get(key)!r}{fix}")
    return "\n".join(lines)


class OfflineTeacher:
    """Teacher top-K read from a `kat kd dump-teacher` directory for the student's samples."""

    def __init__(self, topk_dir, train_dataset, vocab_size: int) -> None:
        path = Path(topk_dir)
        header_file = path / "header.json"
        if not header_file.is_file():
            raise FileNotFoundError(
                f"kd.teacher.topk_dir={path}: no header.json (write it with kat kd dump-teacher)"
            )
        ours = data_description(train_dataset)
        dumped = json.loads(header_file.read_text()).get("extra", {}).get("data")
        if dumped is not None and dumped != ours:
            raise TeacherTopKMismatch(
                f"kd.teacher.topk_dir={path} was dumped for other samples than this run reads "
                f"(the sample order would differ):\n{describe_mismatch(dumped, ours)}"
            )
        tokenizer = train_dataset.config.tokenizer
        self.reader = TeacherTopKReader(
            path,
            tokenizer_fingerprint=tokenizer.fingerprint,
            data_fingerprint=data_fingerprint(ours),
            vocab_size=vocab_size,
        )
        log.info("kd: offline teacher %s (K=%d, %d samples)", path, self.reader.topk, len(self))

    def __len__(self) -> int:
        return len(self.reader)

    def target(self, batch: dict, sample_indices: list[int]) -> TeacherTopK:
        """Top-K of these samples; their tokens are checked against the dumped ones."""
        got = self.reader.batch(sample_indices, batch["tokens"].cpu())
        dev = batch["tokens"].device
        return TeacherTopK(
            got.ids_bsk.to(dev), got.logprobs_bsk.to(dev), got.residual_bs.to(dev), got.temperature
        )


def tp_group():
    """The tensor-parallel group the vocabulary is sharded over."""
    return parallel_state.get_tensor_model_parallel_group()
