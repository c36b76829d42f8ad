"""The datasets of the LM stages: `pretrain_datasets(cfg, run_dir)` (stages pretrain and kd) and
`sft_datasets(cfg, run_dir)` (stage sft), each `(train, valid, test)` for `training.loop.Trainer`.
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
