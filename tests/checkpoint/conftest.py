"""Tiny random Hugging Face models (built with transformers) for the conversion tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and non-trivial (biases, norms ~ 1 +- 0.5, not ones/zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.5 * noise)
            else:
                p.copy_(noise * (0.1 if p.dim() == 1 else 0.05))


def save_qwen2(path: Path, seed: int = 0, shard: str = "200KB", **overrides) -> Path:
    """A random Qwen2ForCausalLM saved (sharded) at `path`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(
        vocab_size=500,  # not a multiple of 128: the vocabulary gets padded
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = Qwen2ForCausalLM(Qwen2Config(**{**cfg, **overrides}))
    _randomize(model, seed)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def save_qwen3_moe(path: Path, seed: int = 0, **overrides) -> Path:
    """A random Qwen3MoeForCausalLM (qk-norm; first layer dense) saved at `path`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**cfg, **overrides}))
    _randomize(model, seed)
    model.save_pretrained(path)
    return path


def save_preset_export(path: Path, preset: str, seed: int = 0, mtp: int = 0) -> Path:
    """A random Hugging Face folder of exactly preset `preset`'s structure, as our export writes
    it: config.json from `hf_config_for`, weights through transformers, and with `mtp` depths
    random MTP heads in `mtp/` (the documented form, checkpoint/hf_mtp.py)."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from kat_megatron.checkpoint.hf_config import hf_config_for, hf_spec_for
    from kat_megatron.checkpoint.hf_mtp import MTP_DIR, mtp_config
    from kat_megatron.checkpoint.mapping import hf_shapes, is_mtp, mtp_is_moe
    from kat_megatron.config.presets import get_preset
    from kat_megatron.config.schema import ModelConfig

    model = ModelConfig(**dict(get_preset(preset), mtp_num_layers=mtp or None))
    spec = hf_spec_for(model)
    hf = AutoModelForCausalLM.from_config(hf_config_for(model, spec, torch.float32))
    _randomize(hf, seed)
    hf.save_pretrained(path)
    if mtp:
        g = torch.Generator().manual_seed(seed + 1)
        shapes = {k: s for k, s in hf_shapes(model, spec).items() if is_mtp(k)}
        tensors = {
            k: (1.0 + 0.5 * torch.randn(s, generator=g))
            if len(s) == 1
            else 0.05 * torch.randn(s, generator=g)
            for k, s in shapes.items()
        }
        (path / MTP_DIR).mkdir()
        save_file(tensors, str(path / MTP_DIR / "model.safetensors"), metadata={"format": "pt"})
        cfg = mtp_config(model, spec.arch, mtp_is_moe(model))
        (path / MTP_DIR / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """dense_a: untied, GQA, padded vocab; dense_b: tied, head_dim 32 != hidden/heads;
    moe: Qwen3-MoE with qk-norm and a dense first layer; kat_moe: kat-200b-a40b's structure
    (preset tiny-qwen3-moe) with one MTP depth."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "dense_a": save_qwen2(root / "dense_a", seed=1),
        "dense_b": save_qwen2(
            root / "dense_b",
            seed=2,
            vocab_size=256,
            num_hidden_layers=2,
            head_dim=32,
            intermediate_size=64,
            tie_word_embeddings=True,
        ),
        "moe": save_qwen3_moe(root / "moe", seed=3),
        "kat_moe": save_preset_export(root / "kat_moe", "tiny-qwen3-moe", seed=4, mtp=1),
    }


@pytest.fixture(scope="session")
def make_qwen2():
    """`make_qwen2(path, seed=.., **config)`: save a random Qwen2ForCausalLM."""
    return save_qwen2
