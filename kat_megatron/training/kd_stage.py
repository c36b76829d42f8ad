"""Stage kd, MTP-enhanced knowledge distillation: `kat train examples/tiny_kd/config.yaml`.

The student is a Megatron-Core `GPTModel` with `model.mtp_num_layers = D` MTP depths (0: main
head only). Each micro-batch runs the student to its hidden states and applies its output layer
to the main head and to every MTP depth (`models.forward.model_heads`); the logits stay sharded
over the vocabulary and `losses.kd.mtp_kd_loss` takes the TP group. The teacher is either
online (a frozen model run in the same forward step, `kd_teacher.OnlineTeacher`; no pipeline
parallelism) or offline (top-K log-probs written by `kat kd dump-teacher`, read for the same
sample indices, `kd_teacher.OfflineTeacher`). The training loop (`training/loop.py`) is shared
with pretraining; the per-depth metrics `kd_ce_d{d}`, `kd_kl_d{d}`, `kd_top1_teacher_d{d}`,
`kd_acceptance_d{d}` and `kd_loss` land in metrics.jsonl next to `loss` (depth-0 CE).

Data: Megatron GPT samples, exactly as stage pretrain reads them (the dump must be made for the
same samples: `kat kd dump-teacher --config` takes them from this config). Positions whose
depth-d target lies in the next EOD-separated document carry no loss
(`kd.mask_document_boundaries`). With `kd.packing` the attention stops at every EOD too:
the micro-batch runs as one THD row (`packed_seq.eod_rows`; the heads come back as `[s, b]`
rows, so the loss is unchanged). See docs/mtp_kd.md.

The forward step of Megatron-Core's schedule gets only `(data_iterator, model)`, so the stage
keeps its state (loss config, teacher, sample indices) in one `KDRuntime` per process, built by
`build_kd` when the trainer builds its data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kat_megatron.config.schema import KatConfig, KDSection, ModelConfig
from kat_megatron.losses.kd import KDConfig, documents_from_eod, mtp_kd_loss
from kat_megatron.models.forward import model_heads
from kat_megatron.models.packed_seq import eod_rows, packing_enabled
from kat_megatron.training.datasets import pretrain_datasets
from kat_megatron.training.kd_teacher import OfflineTeacher, OnlineTeacher, to_device, tp_group

log = logging.getLogger("kat")


class SampleRecorder:
    """The train dataset, remembering which sample indices were read since the last `take()`.

    `training/batches.py` reads a micro-batch's samples when the forward step pulls it from
    the iterator, so `take()` right after `next(data_iterator)` returns exactly that
    micro-batch's dataset indices, in order (with several virtual stages too: each chunk's
    forward step pulls and takes its own copy).
    """

    def __init__(self, dataset, thd: bool = False) -> None:
        self.dataset = dataset
        self.thd = thd
        """Micro-batches run as THD rows (`kd.packing`): the training loop's activation shape."""
        self._read: list[int] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        self._read.append(int(index))
        return self.dataset[index]

    def take(self) -> list[int]:
        read, self._read = self._read, []
        return read


@dataclass
class KDRuntime:
    """What the forward step needs besides the batch and the model."""

    loss_cfg: KDConfig
    teacher: OnlineTeacher | OfflineTeacher | None
    samples: SampleRecorder
    eod_id: int
    vocab_size: int
    mask_documents: bool
    thd_multiple: int | None = None
    """`kd.packing`: the THD row's length multiple (the TP size); None: rows as they are."""


_RUNTIME: KDRuntime | None = None


def kd_loss_config(kd: KDSection, model: ModelConfig) -> KDConfig:
    """The loss's `KDConfig` from the `kd` section (validates `divergence` against the
    registry); `kd.mtp_loss_scaling_factor` None means the model's."""
    lam = kd.mtp_loss_scaling_factor
    return KDConfig(
        alpha=kd.alpha,
        temperature=kd.temperature,
        topk=kd.topk,
        divergence=kd.divergence,
        mtp_loss_scaling_factor=model.mtp_loss_scaling_factor if lam is None else lam,
    )


def check_kd(cfg: KatConfig) -> None:
    """Cross-section checks of `stage: kd` (one-line ValueErrors naming the field)."""
    kd, par = cfg.kd, cfg.parallel
    teacher = kd.teacher_config()
    kd_loss_config(cfg.kd, cfg.model)  # the divergence name, as losses.kd.KDConfig checks it
    depth = cfg.model.mtp_num_layers or 0  # D = 0: the main head only
    if depth >= cfg.data.seq_length:
        raise ValueError(
            f"model.mtp_num_layers={depth}: stage kd needs fewer MTP depths than "
            f"data.seq_length={cfg.data.seq_length}"
        )
    if kd.packing:
        packing_enabled(True, cfg.model, "kd.packing")
        if not kd.mask_document_boundaries:
            raise ValueError(
                "kd.packing=true needs kd.mask_document_boundaries=true (with attention per "
                "document, a position cannot be trained to predict the next document's tokens)"
            )
        if teacher.mode == "offline" and teacher.topk_dir is not None:
            raise ValueError(
                "kd.packing=true with kd.teacher.mode=offline: `kat kd dump-teacher` computes "
                "the top-K with attention across documents; use the online teacher or "
                "kd.packing=false"
            )
    if par.cp != 1:
        raise ValueError(
            "stage kd: parallel.cp must be 1 (the depth-d target shift would cross "
            "context-parallel chunks)"
        )
    if kd.topk > cfg.model.vocab_size:
        raise ValueError(f"kd.topk={kd.topk} exceeds model.vocab_size={cfg.model.vocab_size}")
    if teacher.mode == "online":
        if teacher.ckpt is None and kd.alpha > 0:
            raise ValueError(
                "kd.teacher.ckpt: stage kd with kd.teacher.mode=online needs the teacher's "
                "checkpoint directory (or kd.alpha=0 for cross-entropy only)"
            )
        if teacher.ckpt is not None and par.pp > 1:
            raise ValueError(
                f"kd.teacher.mode=online with parallel.pp={par.pp}: the online teacher runs "
                "without pipeline parallelism only; write its top-K with `kat kd dump-teacher` "
                "and set kd.teacher.mode=offline, kd.teacher.topk_dir=DIR"
            )
    elif teacher.topk_dir is None and kd.alpha > 0:
        raise ValueError(
            "kd.teacher.topk_dir: stage kd with kd.teacher.mode=offline needs the directory "
            "written by `kat kd dump-teacher` (or kd.alpha=0 for cross-entropy only)"
        )


def build_kd(cfg: KatConfig, run_dir: Path) -> tuple[Any, Any, Any]:
    """Stage kd's datasets `(train, valid, test)`; builds the teacher and the runtime."""
    global _RUNTIME
    train, valid, test = pretrain_datasets(cfg, run_dir)
    samples = SampleRecorder(train, thd=cfg.kd.packing)
    tokenizer = train.config.tokenizer
    teacher_cfg = cfg.kd.teacher_config()
    loss_cfg = kd_loss_config(cfg.kd, cfg.model)
    teacher: OnlineTeacher | OfflineTeacher | None = None
    if teacher_cfg.mode == "online" and teacher_cfg.ckpt is not None:
        teacher = OnlineTeacher(cfg, tokenizer.fingerprint)
    elif teacher_cfg.mode == "offline" and teacher_cfg.topk_dir is not None:
        teacher = OfflineTeacher(teacher_cfg.topk_dir, train, cfg.model.vocab_size)
    if teacher is None:
        log.info("kd: no teacher (kd.alpha=0): cross-entropy on every head only")
    _RUNTIME = KDRuntime(
        loss_cfg=loss_cfg,
        teacher=teacher,
        samples=samples,
        eod_id=int(tokenizer.eod),
        vocab_size=cfg.model.vocab_size,
        mask_documents=cfg.kd.mask_document_boundaries,
        thd_multiple=cfg.parallel.tp if cfg.kd.packing else None,
    )
    log.info(
        "kd: D=%d MTP depths, alpha=%g, tau=%g, %s, top-k=%d, lambda=%g",
        cfg.model.mtp_num_layers or 0,
        loss_cfg.alpha,
        loss_cfg.temperature,
        loss_cfg.divergence,
        loss_cfg.topk,
        loss_cfg.mtp_loss_scaling_factor,
    )
    return samples, valid, test


def runtime() -> KDRuntime:
    if _RUNTIME is None:
        raise RuntimeError("stage kd: build_kd(cfg, run_dir) must run before the forward step")
    return _RUNTIME


def kd_loss(
    output_tensor: torch.Tensor,
    *,
    heads: list[torch.Tensor],
    batch: dict,
    teacher: Any,
    rt: KDRuntime,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`mtp_kd_loss` of one micro-batch: `(loss_sum, num_tokens, metrics)` (see losses/kd.py)."""
    docs = documents_from_eod(batch["tokens"], rt.eod_id) if rt.mask_documents else None
    return mtp_kd_loss(
        heads,
        batch["labels"],
        batch["loss_mask"],
        teacher,
        rt.loss_cfg,
        documents=docs,
        vocab_size=rt.vocab_size,
        group=tp_group(),
    )


def _not_on_this_stage(output_tensor: torch.Tensor):
    raise AssertionError("the KD loss runs on the last pipeline stage only")


def kd_forward_step(data_iterator, model):
    """Megatron-Core forward step: student heads (and the teacher's target), and the KD loss."""
    rt = runtime()
    batch = to_device(next(data_iterator))
    if rt.thd_multiple is not None:
        batch["thd"] = eod_rows(batch["tokens"], rt.eod_id, rt.thd_multiple)
    indices = rt.samples.take()
    output, heads = model_heads(model, batch)
    if heads is None:  # not the last pipeline stage: pass the hidden states on
        return output, _not_on_this_stage
    teacher = rt.teacher.target(batch, indices) if rt.teacher is not None else None
    return output, partial(kd_loss, heads=heads, batch=batch, teacher=teacher, rt=rt)
