"""kat checkpoint -> Hugging Face folder: `kat convert mcore-to-hf --mcore DIR --out DIR`.

One process, no torch.distributed: the checkpoint is read one canonical tensor at a time
(`McoreReader`), mapped to Hugging Face tensors (`mapping.to_hf`) and streamed into planned
safetensors shards (`ShardedWriter`), so resident memory stays near the largest tensor. The
folder is complete for transformers and vLLM: shards + `model.safetensors.index.json`,
`config.json`, `generation_config.json`, and the tokenizer files carrying the AutoThink chat
template (or the tokenizer's own with `--chat-template keep`, or a .jinja file). The tokenizer is
the one the checkpoint records (`data.tokenizer` of its run config: what training used, or the
Hugging Face folder a conversion came from); `--tokenizer DIR` overrides it. MTP heads
(`model.mtp_num_layers`) go to `OUT/mtp/` (`checkpoint/hf_mtp.py`), beside a main folder that
stays the stock architecture.
It is written as `OUT.tmp` and renamed to `OUT` when complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kat_megatron.checkpoint.hf_config import hf_config_for, hf_spec_for
from kat_megatron.checkpoint.hf_io import ShardedWriter, atomic_dir
from kat_megatron.checkpoint.hf_mtp import MTP_DIR, mtp_config
from kat_megatron.checkpoint.mapping import hf_shapes, is_mtp, mtp_is_moe, to_hf
from kat_megatron.checkpoint.mcore_io import McoreReader

log = logging.getLogger(__name__)

AUTOTHINK_TEMPLATE = (
    Path(__file__).resolve().parent.parent / "assets" / "chat_templates" / "autothink.jinja"
)


def _chat_template(choice: str) -> str | None:
    """Template text for `--chat-template` (autothink | keep | FILE); None keeps the tokenizer's."""
    if choice == "keep":
        return None
    path = AUTOTHINK_TEMPLATE if choice == "autothink" else Path(choice)
    if not path.is_file():
        raise FileNotFoundError(f"chat template {path} not found")
    return path.read_text()


def recorded_tokenizer(reader: McoreReader) -> str:
    """The tokenizer checkpoint `reader` was trained (or converted) with: its `data.tokenizer`."""
    name = (reader.meta["config"].get("data") or {}).get("tokenizer")
    if not name:
        raise ValueError(f"{reader.path}: no tokenizer recorded (data.tokenizer); pass --tokenizer")
    return name


def save_tokenizer(tokenizer: str | Path, out: Path, chat_template: str) -> dict[str, Any]:
    """Write the tokenizer files into `out` (`tiny` or a directory); returns its bos/eos/pad
    token ids."""
    from kat_megatron.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(str(tokenizer))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{err}; pass --tokenizer DIR to export with another one") from None
    template = _chat_template(chat_template)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(out))
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return {k: v for k, v in ids.items() if v is not None}


def write_tensors(reader: McoreReader, out: Path, spec, dtype, max_shard_bytes: int) -> int:
    """Stream every tensor of `reader` into `out` as HF safetensors shards (MTP heads into
    `out/mtp/`); returns bytes."""
    model = reader.model
    plan = [(key, shape, dtype) for key, shape in hf_shapes(model, spec).items()]
    writers = {False: ShardedWriter(out, [e for e in plan if not is_mtp(e[0])], max_shard_bytes)}
    if model.mtp_num_layers:
        (out / MTP_DIR).mkdir()
        mtp_plan = [e for e in plan if is_mtp(e[0])]
        writers[True] = ShardedWriter(out / MTP_DIR, mtp_plan, max_shard_bytes)
        config = mtp_config(model, spec.arch, mtp_is_moe(model))
        (out / MTP_DIR / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in tqdm(reader.names(), desc="mcore-to-hf", unit="tensor"):
        for key, t in to_hf(name, reader.get(name), model, spec):
            writers[is_mtp(key)].write(key, t.to(dtype))
    for writer in writers.values():
        writer.close()
    return sum(writer.total_size for writer in writers.values())


def export_to_hf(
    mcore: str | Path,
    out: str | Path,
    dtype: torch.dtype | None = None,
    arch: str | None = None,
    tokenizer: str | Path | None = None,
    chat_template: str = "autothink",
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Convert checkpoint `mcore` into Hugging Face folder `out` (see the module docstring)."""
    from transformers import GenerationConfig

    reader = McoreReader(mcore)
    spec = hf_spec_for(reader.model, arch)
    dtype = dtype or reader.dtype
    with atomic_dir(out, overwrite) as tmp:
        size = write_tensors(reader, tmp, spec, dtype, max_shard_bytes)
        ids = save_tokenizer(tokenizer or recorded_tokenizer(reader), tmp, chat_template)
        hf_config_for(reader.model, spec, dtype, ids).save_pretrained(str(tmp))
        GenerationConfig(**ids).save_pretrained(str(tmp))
    log.info("wrote %s (%s, %.2f GB of weights)", out, spec.arch, size / 1e9)
    return Path(out)
