"""GPT pretraining datasets from `DataConfig` via Megatron-Core's BlendedMegatronDatasetBuilder.

Sources: `data.paths` (Megatron .bin/.idx prefixes, optionally weighted), `data.jsonl` (tokenized
into `<cache_dir>/jsonl/` on first use, reused while the file's size and mtime, the tokenizer and
the text key are unchanged), or `data.mock` (MockGPTDataset). Megatron's sample indices are
cached in `<cache_dir>/indices/`.

Each sample is a dict of torch tensors of length seq_length: `tokens`, `labels` (tokens shifted
by one), `loss_mask` (float, 0 only at padding), `position_ids`, and, when
`create_attention_mask`, `attention_mask` ([1, s, s] bool, True = masked).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from kat_megatron.config.schema import DataConfig
from kat_megatron.data.preprocess import META_VERSION, preprocess_jsonl
from kat_megatron.data.tokenizer import MegatronTokenizerAdapter, synthetic_documents

logger = logging.getLogger(__name__)

Blend = tuple[list[str], list[float] | None]


def write_synthetic_corpus(path: str | os.PathLike, n_docs: int, seed: int = 0) -> Path:
    """Write `n_docs` deterministic short documents as JSONL ({"text": ...} per line)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": doc}) + "\n" for doc in synthetic_documents(n_docs, seed)]
    out.write_text("".join(lines), encoding="utf-8")
    return out


def parse_blend(entries: Sequence[Any], what: str = "data.paths") -> Blend:
    """`[p, ...]` -> ([p, ...], None); `[w, p, w, p, ...]` -> ([p, ...], [w, ...])."""
    entries = list(entries)

    def is_number(x: Any) -> bool:
        if isinstance(x, bool):
            return False
        try:
            float(x)
        except (TypeError, ValueError):
            return False
        return True

    if len(entries) >= 2 and len(entries) % 2 == 0 and all(map(is_number, entries[::2])):
        weights = [float(w) for w in entries[::2]]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"{what}: blend weights must be >= 0 with a positive sum: {weights}")
        return [str(p) for p in entries[1::2]], weights
    if any(is_number(x) for x in entries):
        raise ValueError(f"{what}: expected [prefix, ...] or [weight, prefix, ...]: {entries}")
    return [str(p) for p in entries], None


def jsonl_cache_prefix(path: str | os.PathLike, cache_dir: str | os.PathLike, fp: str) -> Path:
    """Where `path` tokenized with the tokenizer of fingerprint `fp` lives in `cache_dir`."""
    src = Path(path).resolve()
    digest = hashlib.sha256(f"{src}\0{fp}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "jsonl" / f"{src.stem}-{digest}"


def jsonl_cache_is_fresh(prefix: Path, src: Path, fingerprint: str, text_key: str) -> bool:
    """True when `prefix`.{bin,idx,meta.json} were built from `src` as it is now."""
    meta_path = Path(f"{prefix}.meta.json")
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    if not (meta_path.is_file() and bin_path.is_file() and idx_path.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
        (inp,) = meta["inputs"]
        st = src.stat()
        return (
            meta["format_version"] == META_VERSION
            and meta["tokenizer_fingerprint"] == fingerprint
            and meta["json_key"] == text_key
            and meta["append_eod"] is True
            and inp["size"] == st.st_size
            and inp["mtime_ns"] == st.st_mtime_ns
            and meta["bin_bytes"] == bin_path.stat().st_size
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_jsonl(
    files: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    tokenizer: MegatronTokenizerAdapter,
    text_key: str = "text",
    workers: int | None = None,
) -> list[str]:
    """Tokenize each JSONL file into `cache_dir` unless an up-to-date copy exists; return prefixes.

    With torch.distributed initialised, rank 0 goes first and the others wait at a barrier (they
    then find the cache, or, on a node-local cache_dir, build their own copy). Every rank must
    call this.
    """
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    first = not dist or torch.distributed.get_rank() == 0
    if dist and not first:
        torch.distributed.barrier()
    prefixes = []
    for f in files:
        src = Path(f)
        if not src.is_file():
            raise FileNotFoundError(f"data.jsonl: file not found: {src}")
        prefix = jsonl_cache_prefix(src, cache_dir, tokenizer.fingerprint)
        if jsonl_cache_is_fresh(prefix, src, tokenizer.fingerprint, text_key):
            logger.info("data.jsonl: reusing %s for %s", prefix, src)
        else:
            logger.info("data.jsonl: tokenizing %s into %s", src, prefix)
            n = workers or (1 if src.stat().st_size < (16 << 20) else min(8, os.cpu_count() or 1))
            preprocess_jsonl(
                [src], prefix, tokenizer.hf_tokenizer, json_key=text_key, workers=n, progress=False
            )
        prefixes.append(str(prefix))
    if dist and first:
        torch.distributed.barrier()
    return prefixes


def build_gpt_datasets(
    data_cfg: DataConfig,
    seq_length: int | None,
    seed: int,
    num_samples: tuple[int | None, int | None, int | None],
    cache_dir: str | os.PathLike | None = None,
    tokenizer: MegatronTokenizerAdapter | Any | None = None,
    *,
    create_attention_mask: bool | None = None,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> tuple[Any, Any, Any]:
    """Build the (train, valid, test) GPT datasets; a split with weight 0 comes back as None.

    Args:
        data_cfg: the `data` section (paths / jsonl / mock, tokenizer, text_key, split).
        seq_length: tokens per sample; None means `data_cfg.seq_length`.
        seed: seed of Megatron's document/sample shuffles.
        num_samples: samples wanted per split (None = one epoch); data is repeated to reach it.
            A blend of several sources may hold a few more (Megatron rounds up per source).
            Unweighted blends are weighted by token count so that the counts are reached.
        cache_dir: tokenized JSONL and sample indices; None means `data_cfg.cache_dir`.
        tokenizer: a MegatronTokenizerAdapter, a HF tokenizer, or None to load `data_cfg.tokenizer`.
        create_attention_mask: put a [1, s, s] causal mask in each sample. None means "only
            without CUDA": Megatron-Core's local attention builds its default causal mask with
            device="cuda", so CPU runs need the mask from the dataset; TE/CUDA runs do not.
        is_built_on_rank: Megatron's hook; building on every rank is the default.

    Every rank must call this when torch.distributed is initialised (the builder uses barriers).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    if tokenizer is None:
        tokenizer = MegatronTokenizerAdapter.from_name(data_cfg.tokenizer)
    elif not isinstance(tokenizer, MegatronTokenizerAdapter):
        tokenizer = MegatronTokenizerAdapter(tokenizer, name=data_cfg.tokenizer)
    seq_length = seq_length or data_cfg.seq_length
    cache = cache_dir if cache_dir is not None else data_cfg.cache_dir
    if create_attention_mask is None:
        create_attention_mask = not torch.cuda.is_available()
    if len(num_samples) != 3:
        raise ValueError(f"num_samples={num_samples!r}: expected (train, valid, test)")

    blend: Blend | None = None
    if not data_cfg.mock:
        if not data_cfg.paths and not data_cfg.jsonl:
            raise ValueError("data: set data.paths, data.jsonl or data.mock=true")
        prefixes, weights = parse_blend(data_cfg.paths, "data.paths")
        jsonl_files, jsonl_weights = parse_blend(data_cfg.jsonl, "data.jsonl")
        if prefixes and jsonl_files and (weights is None) != (jsonl_weights is None):
            raise ValueError("data.paths and data.jsonl: give weights in both lists or in neither")
        for p in prefixes:
            if not (os.path.isfile(f"{p}.bin") and os.path.isfile(f"{p}.idx")):
                raise FileNotFoundError(f"data.paths: {p}.bin / {p}.idx not found")
        if jsonl_files:
            if cache is None:
                raise ValueError("data.jsonl needs data.cache_dir (or a cache_dir argument)")
            jsonl_prefixes = prepare_jsonl(jsonl_files, cache, tokenizer, data_cfg.text_key)
            prefixes = prefixes + jsonl_prefixes
            if weights is not None or jsonl_weights is not None:
                weights = (weights or []) + (jsonl_weights or [])
        if len(prefixes) == 1:
            weights = None  # a weight on a single source would only add a BlendedDataset layer
        # A split of weight 0 needs no count (Megatron insists on counts once weights are given).
        split_weights = [float(x) for x in data_cfg.split.split(",")]
        num_samples = tuple(
            0 if w == 0 and n is None else n for w, n in zip(split_weights, num_samples)
        )
        if weights is None and len(prefixes) > 1 and None not in num_samples:
            # Megatron caps an unweighted blend at one epoch of every source (fewer samples than
            # asked for); weighting by token count keeps the natural mix and repeats data instead.
            weights = [_num_tokens(p) for p in prefixes]
        if weights is not None and None in num_samples:
            raise ValueError(
                f"num_samples={num_samples!r}: a weighted blend needs a count for every split"
            )
        blend = (prefixes, weights)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=data_cfg.split if blend is not None else None,
        path_to_cache=str(Path(cache) / "indices") if cache is not None else None,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
    )
    cls = MockGPTDataset if data_cfg.mock else GPTDataset
    builder = BlendedMegatronDatasetBuilder(cls, list(num_samples), is_built_on_rank, config)
    with _rank_zero_without_distributed():
        train_ds, valid_ds, test_ds = builder.build()
    return train_ds, valid_ds, test_ds


def _num_tokens(prefix: str) -> float:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return float(ds.sequence_lengths.sum(dtype="int64"))


@contextlib.contextmanager
def _rank_zero_without_distributed() -> Iterator[None]:
    """Let `torch.distributed.get_rank()` answer 0 while no process group exists.

    Megatron-Core 0.16.1's BlendedDataset calls get_rank() unguarded when its index cache misses,
    which raises without torch.distributed; every other dataset call site checks
    is_initialized() first.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with mock.patch.object(torch.distributed, "get_rank", lambda group=None: 0):
        yield
