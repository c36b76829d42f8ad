"""The datasets of the LM stages: `pretrain_datasets(cfg, run_dir)` (stages pretrain and kd),
`pretrain_stage_datasets` (stage pretrain: with `data.packing=true` each sample's EOD-joined
documents become THD documents, `EodDocuments`) and `sft_datasets(cfg, run_dir)` (stage sft),
each `(train, valid, test)` for `training.loop.Trainer`.
"""

from __future__ import annotations

from pathlib import Path

from kat_megatron.config.schema import KatConfig


def pretrain_datasets(cfg: KatConfig, run_dir: Path):
    """Megatron GPT datasets sized for the whole run (data repeats to reach the count)."""
    from kat_megatron.data.gpt_data import build_gpt_datasets

    t = cfg.training
    evals = t.steps // t.eval_interval + 1 if t.eval_interval else 1
    num_samples = (
        t.steps * t.global_batch_size,
        evals * t.eval_iters * t.global_batch_size,
        t.global_batch_size,
    )
    cache = cfg.data.cache_dir or str(run_dir / "data_cache")
    return build_gpt_datasets(
        cfg.data, cfg.data.seq_length, t.seed, num_samples, cache_dir=cache,
        create_attention_mask=False,
    )  # fmt: skip


def pretrain_packing(cfg: KatConfig) -> bool:
    """Whether stage pretrain attends per document (`data.packing=true`; None or false: across
    the documents of a sample, Megatron-LM's default); a one-line ValueError when the attention
    cannot honour THD params."""
    from kat_megatron.models.packed_seq import packing_enabled

    return bool(cfg.data.packing) and packing_enabled(True, cfg.model, "data.packing")


class EodDocuments:
    """A GPT dataset whose samples carry `cu_seqlens`: each EOD ends a document (the EOD belongs
    to it: `models.packed_seq.eod_lengths`, as stage kd's `eod_rows` counts) and the sample's
    end ends one, so
    `training.batches.collate` turns a micro-batch into one THD row with attention per document
    and positions restarting at 0 (`thd` tells the loop). Labels and the loss mask are the
    dataset's: the EOD's label is the next document's first token, as without packing."""

    thd = True

    def __init__(self, dataset, eod_id: int) -> None:
        self.dataset, self.eod_id = dataset, int(eod_id)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        from itertools import accumulate

        from kat_megatron.models.packed_seq import eod_lengths

        sample = dict(self.dataset[index])
        lengths = eod_lengths(sample["tokens"].tolist(), self.eod_id)
        sample["cu_seqlens"] = [0, *accumulate(lengths)]
        return sample


def pretrain_stage_datasets(cfg: KatConfig, run_dir: Path):
    """Stage pretrain's datasets: `pretrain_datasets`, each wrapped in `EodDocuments` with
    `data.packing=true`."""
    datasets = pretrain_datasets(cfg, run_dir)
    if not pretrain_packing(cfg):
        return datasets
    eod = next(d for d in datasets if d is not None).config.tokenizer.eod
    return tuple(None if d is None else EodDocuments(d, eod) for d in datasets)


def sft_packing(cfg: KatConfig) -> bool:
    """Whether stage sft feeds its packed rows as THD rows (`data.packing`, resolved against
    the attention); a one-line ValueError for a combination that cannot run."""
    from kat_megatron.models.builder import te_available
    from kat_megatron.models.packed_seq import packing_enabled

    thd = packing_enabled(cfg.data.packing, cfg.model, "data.packing")
    te = cfg.model.backend == "te" or (cfg.model.backend == "auto" and te_available())
    if te and not thd:
        raise ValueError(
            "stage sft with Transformer Engine takes packed rows as THD only (no dense "
            "block-causal mask): set data.packing=true (or model.backend=local)"
        )
    return thd


def sft_datasets(cfg: KatConfig, run_dir: Path):
    """Packed chat rows (loss on assistant tokens) with their document boundaries for THD
    `PackedSeqParams` (`data.packing`), or per-document dense attention masks."""
    from kat_megatron.data.sft_data import build_sft_dataset

    return build_sft_dataset(cfg.data, cfg.training.seed, thd=sft_packing(cfg)), None, None
