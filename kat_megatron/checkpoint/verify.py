"""Logits of transformers vs ours: `kat convert verify --hf DIR --mcore DIR --nproc 2`.

Rank 0 runs the Hugging Face model with transformers (fp32, CPU, eager attention); then, for each
requested layout, every rank re-initialises Megatron's groups, builds our model in fp32, loads the
checkpoint with `training.checkpointing.load_checkpoint` (resharding as training does) and runs a
forward pass (`models.forward.forward_logits`). Rank 0 compares the full-vocabulary logits over
every position: max and mean absolute difference and top-1 (argmax) agreement.

MTP heads: when the checkpoint has `model.mtp_num_layers = D` and the HF folder its `mtp/`
heads, every depth is compared too (row key `mtp`: one comparison per depth), against
`hf_mtp.mtp_reference_logits` (transformers' own decoder layer, norms and head on the exported
MTP weights).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from kat_megatron.checkpoint.hf_mtp import mtp_reference_logits, read_mtp_config
from kat_megatron.checkpoint.mapping import EMBEDDING
from kat_megatron.checkpoint.mcore_io import McoreReader
from kat_megatron.config.schema import ParallelConfig
from kat_megatron.models.builder import padded_vocab_size
from kat_megatron.models.forward import forward_logits
from kat_megatron.parallel.init import initialize
from kat_megatron.training.checkpointing import load_frozen_model

_LAYOUT_RE = re.compile(r"(tp|pp|ep|etp)(\d+)")


@dataclass(frozen=True)
class Layout:
    """A parallel layout written as `tp2pp2`, `ep2`, `tp1` (unnamed sizes are 1)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None

    @classmethod
    def parse(cls, text: str) -> Layout:
        parts = _LAYOUT_RE.findall(text)
        if not parts or "".join(a + b for a, b in parts) != text:
            raise ValueError(f"layout {text!r}: expected e.g. tp2, pp2, tp2pp2, ep2, tp2ep2etp1")
        return cls(**{k: int(v) for k, v in parts})

    @property
    def name(self) -> str:
        etp = f"etp{self.etp}" if self.etp is not None else ""
        return f"tp{self.tp}pp{self.pp}" + (f"ep{self.ep}" if self.ep > 1 else "") + etp

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp)


def random_tokens(vocab: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """One [batch, seq] batch of uniform token ids (the default prompts)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g)]


def prompt_tokens(path: str | Path, tokenizer_dir: str | Path) -> list[torch.Tensor]:
    """One [1, n] batch per non-empty line of `path`, tokenized with the HF tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lines = [x for x in Path(path).read_text().splitlines() if x.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts (one per line)")
    return [torch.tensor([tok(x)["input_ids"]]) for x in lines]


@torch.no_grad()
def hf_logits(hf_dir: str | Path, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """transformers' fp32 logits [b, s, vocab] for each batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return [model(input_ids=b).logits.float() for b in batches]


def check_vocab_padding(reader: McoreReader, tp: int) -> None:
    """ValueError when the checkpoint's padded vocabulary is not the one TP=`tp` builds."""
    stored = reader.shape(EMBEDDING)[0]
    want = padded_vocab_size(reader.model, tp)
    if stored != want:
        raise ValueError(
            f"{reader.path}: vocabulary padded to {stored} rows, but TP={tp} pads to {want}; "
            f"run `kat convert reshard --tp {tp}` first"
        )


def ours_logits(
    mcore: str | Path, layout: Layout, batches: list[torch.Tensor], heads: bool = False
) -> list | None:
    """Our fp32 logits [b, s, vocab] (`heads`: [1 + D, b, s, vocab], every head) for each batch
    at `layout`, on rank 0 (None elsewhere)."""
    reader = McoreReader(mcore)
    check_vocab_padding(reader, layout.tp)
    initialize(layout.parallel(), seed=0, model=reader.model)
    chunks = load_frozen_model(reader.path, reader.model, layout.parallel(), "fp32")
    out = []
    for tokens in batches:
        logits = forward_logits(chunks, tokens, heads=heads)
        mine = None
        if (
            logits is not None
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        ):
            mine = logits[..., : reader.model.vocab_size]
        got = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, got, dst=0)
        out.append(next(x for x in got if x is not None) if got else None)
    return out if dist.get_rank() == 0 else None


def compare(ref: list[torch.Tensor], ours: list[torch.Tensor]) -> dict[str, float]:
    """max/mean |ref - ours| over all logits and top-1 agreement over all positions."""
    a = torch.cat([x.reshape(-1, x.shape[-1]) for x in ref])
    b = torch.cat([x.reshape(-1, x.shape[-1]) for x in ours])
    if a.shape != b.shape:
        raise ValueError(
            f"logits shapes differ: transformers {list(a.shape)}, ours {list(b.shape)}"
        )
    diff = (a - b).abs()
    return {
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "positions": a.shape[0],
    }


def run_verify(
    hf_dir: str | Path, mcore: str | Path, layouts: list[Layout], batches: list[torch.Tensor]
) -> list[dict]:
    """Every rank: compare at each layout. Rank 0 returns one result dict per layout."""
    depth = McoreReader(mcore).model.mtp_num_layers or 0
    heads = bool(depth) and read_mtp_config(hf_dir) is not None
    rank0 = dist.get_rank() == 0
    ref = hf_logits(hf_dir, batches) if rank0 else None
    ref_mtp = mtp_reference_logits(hf_dir, batches) if rank0 and heads else None
    results = []
    for layout in layouts:
        ours = ours_logits(mcore, layout, batches, heads=heads)
        if ours is None:
            continue
        if not heads:
            results.append({"layout": layout.name, **compare(ref, ours)})
            continue
        row = {"layout": layout.name, **compare(ref, [x[0] for x in ours])}
        row["mtp"] = [
            {"depth": k, **compare([r[k] for r in ref_mtp], [x[1 + k] for x in ours])}
            for k in range(depth)
        ]
        results.append(row)
    return results
