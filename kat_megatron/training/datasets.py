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


def sft_datasets(cfg: KatConfig, run_dir: Path):
    """Packed chat rows with per-document attention masks (loss on assistant tokens)."""
    from kat_megatron.data.sft_data import build_sft_dataset
    from kat_megatron.models.builder import resolve_backend

    if resolve_backend(cfg.model) == "te":
        raise ValueError(
            "stage sft with model.backend=te: packed rows need THD packed_seq_params, which "
            "kat does not wire up yet; use model.backend=local"
        )
    return build_sft_dataset(cfg.data, cfg.training.seed), None, None
