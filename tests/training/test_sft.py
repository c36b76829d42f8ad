"""SFT stage (`stage: sft`): packed chat rows train like unpacked ones, at any TP.

- Packed vs unpacked: one forward of a packed row (documents separated by the block-diagonal
  attention mask) gives, on the assistant tokens, the same per-token losses as each document run
  alone with the plain causal mask. Tolerance 1e-5 absolute: fp32 attention over a different
  number of (exactly zero-weighted, masked) keys changes only summation order.
- Layouts: 6 steps of `kat train` with stage sft on tiny-moe from one initial checkpoint give the
  same losses at TP=2, PP=2 and EP=2 as on one rank (relative 1e-5, the bound and argument of
  tests/training/parity_common.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from kat_megatron.data.autothink import AutoThinkResponse, render_response

pytestmark = pytest.mark.timeout(900)


def write_chats(path: Path, n: int, seed: int = 0) -> Path:
    """Synthetic AutoThink conversations: easy sums answered directly, products with reasoning."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        if rng.random() < 0.5:
            resp = AutoThinkResponse("Simple addition.", "think_off", str(a + b))
            q = f"What is {a} + {b}?"
        else:
            resp = AutoThinkResponse(
                "Needs a few steps.", "think_on", str(a * b), think=f"{a} * {b} = {a * b}"
            )
            q = f"What is {a} * {b}?"
        msgs = [
            {"role": "user", "content": q},
            {"role": "assistant", "content": render_response(resp)},
        ]
        lines.append(json.dumps({"messages": msgs}))
    lines.insert(3, "{not json")  # malformed lines are reported and skipped, not fatal
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_config_and_init(
    tmp_path: Path, kat, preset: str, chats: int, seed: int, steps: int
) -> tuple[Path, str]:
    """An SFT config (`preset`, `chats` chat records of `seed`, micro-batch 2, global batch 4,
    seq 128, fp32 on CPU) and the `checkpoint.load=` override of its step-0 checkpoint, so that
    runs compared with each other start from the same weights."""
    data = write_chats(tmp_path / "chats.jsonl", chats, seed=seed)
    cfg = {
        "stage": "sft",
        "model": {"preset": preset},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1},
        "training": {"steps": steps, "micro_batch_size": 2, "global_batch_size": 4},
        "data": {"jsonl": [str(data)], "seq_length": 128},
        "checkpoint": {"save": False},
        "logging": {"tensorboard": False},
    }
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(cfg))
    init = tmp_path / "init"
    kat(["train", str(config), f"run.dir={init}", "training.steps=0", "checkpoint.save=true"])
    return config, f"checkpoint.load={init / 'checkpoints' / 'iter_0000000'}"


def test_packed_rows_match_unpacked_documents(tmp_path, tiny_tokenizer):
    from kat_megatron.config import ModelConfig, ParallelConfig
    from kat_megatron.config.presets import get_preset
    from kat_megatron.data.packing import pack_examples, tokenize_chat
    from kat_megatron.data.sft_data import read_chat_records
    from kat_megatron.models.builder import build_model
    from kat_megatron.parallel.init import initialize, shutdown

    convs, problems = read_chat_records([str(write_chats(tmp_path / "c.jsonl", 6))])
    assert len(convs) == 6 and len(problems) == 1 and ":4:" in problems[0]
    examples = [tokenize_chat(tiny_tokenizer, m) for m in convs]
    row = pack_examples(examples, seq_length=512, pad_id=0).sequences[0]
    assert len(row.cu_seqlens) == 7  # all six documents in one row

    model_cfg = ModelConfig(**get_preset("tiny-dense"))
    initialize(ParallelConfig(), seed=3, model=model_cfg)
    try:
        model = build_model(model_cfg, ParallelConfig(), "fp32")[0].eval()
        with torch.no_grad():
            packed = model(
                torch.from_numpy(row.tokens_s)[None],
                torch.from_numpy(row.position_ids_s)[None],
                torch.from_numpy(row.attention_mask())[None],
                labels=torch.from_numpy(row.labels_s)[None],
            )[0]
            for i, j in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:]):
                alone = model(
                    torch.from_numpy(row.tokens_s[i:j])[None],
                    torch.from_numpy(row.position_ids_s[i:j])[None],
                    None,
                    labels=torch.from_numpy(row.labels_s[i:j])[None],
                )[0]
                mask = torch.from_numpy(row.loss_mask_s[i:j]) > 0
                assert mask.any()
                diff = (packed[i:j][mask] - alone[mask]).abs().max().item()
                assert diff <= 1e-5, diff
    finally:
        shutdown()


def test_sft_layouts_match_one_rank(tmp_path, kat, metrics):
    """tiny-moe SFT from one initial checkpoint: TP=2, PP=2 and EP=2 reproduce one rank."""
    config, load = sft_config_and_init(tmp_path, kat, "tiny-moe", chats=64, seed=1, steps=6)
    proc = kat(["train", str(config), f"run.dir={tmp_path / 'base'}", load])
    assert "skipped 1 malformed chat record" in proc.stderr
    base = [r["loss"] for r in metrics(tmp_path / "base")]
    assert len(base) == 6 and base[-1] < base[0]  # it learns
    for layout in ("parallel.tp=2", "parallel.pp=2", "parallel.ep=2"):
        run = tmp_path / layout.replace("=", "")
        kat(["train", str(config), f"run.dir={run}", load, layout], nproc=2)
        other = [r["loss"] for r in metrics(run)]
        rel = max(abs(a - b) / abs(a) for a, b in zip(base, other))
        print(f"SFT {layout} vs one rank: max relative loss difference {rel:.2e}")
        assert len(other) == 6 and rel <= 1e-5, (base, other)
