"""Depth up-scaling of a Hugging Face folder: `kat convert upscale-depth --hf DIR --out DIR
--layers 80 [--scheme stack|interleave|interleave-identity]`.

KAT-V1-40B grew Qwen2.5-32B from 64 to 80 layers before continued pre-training. With n source
layers and N target layers (n < N <= 2n), the schemes are (see docs/conversion.md):

- `stack` (SOLAR's depth up-scaling): the first ceil(N/2) layers followed by the last
  floor(N/2); for 64 -> 80, layers 0-39 then 24-63 (layers 24-39 appear twice).
- `interleave`: N - n evenly spaced layers are each followed by a copy of themselves; for
  64 -> 80, every 4th layer (3, 7, ..., 63) is doubled.
- `interleave-identity` (LLaMA-Pro's block expansion): as `interleave`, but each copy's
  attention output projection and MLP down projection(s) are zero, so the copy adds nothing to
  the residual stream and the model computes exactly the source model's function at step 0.

Streaming: tensors are read one at a time from the source shards and written into planned
shards; config.json gets the new depth (and remapped per-layer lists); every other file of the
folder (tokenizer, generation config) is copied.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tqdm import tqdm

from kat_megatron.checkpoint.hf_config import architecture, read_hf_config
from kat_megatron.checkpoint.hf_io import INDEX, HFReader, ShardedWriter, atomic_dir

SCHEMES = ("stack", "interleave", "interleave-identity")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# tensors whose output enters the residual stream: zero in an identity copy
_RESIDUAL_OUT = re.compile(
    r"^(self_attn\.o_proj\.(weight|bias)|mlp\.(shared_expert\.)?down_proj\.weight"
    r"|mlp\.experts\.(\d+\.down_proj\.weight|down_proj))$"
)


def layer_plan(n: int, target: int, scheme: str) -> list[tuple[int, bool]]:
    """For each target layer: (source layer, whether it is a zeroed identity copy)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {list(SCHEMES)}")
    if not n < target <= 2 * n:
        raise ValueError(f"--layers {target}: expected more than {n} and at most {2 * n}")
    if scheme == "stack":
        first = (target + 1) // 2
        return [(i, False) for i in range(first)] + [
            (i, False) for i in range(n - target + first, n)
        ]
    extra = target - n
    doubled = {(j + 1) * n // extra - 1 for j in range(extra)}
    plan: list[tuple[int, bool]] = []
    for i in range(n):
        plan.append((i, False))
        if i in doubled:
            plan.append((i, scheme == "interleave-identity"))
    return plan


def _new_config(raw: dict, plan: list[tuple[int, bool]]) -> dict:
    cfg = dict(raw, num_hidden_layers=len(plan))
    if isinstance(raw.get("layer_types"), list):
        cfg["layer_types"] = [raw["layer_types"][src] for src, _ in plan]
    if raw.get("mlp_only_layers"):
        dense = set(raw["mlp_only_layers"])
        cfg["mlp_only_layers"] = [j for j, (src, _) in enumerate(plan) if src in dense]
    if "max_window_layers" in raw:
        cfg["max_window_layers"] = len(plan)
    return cfg


def _tensor_plan(reader: HFReader, plan: list[tuple[int, bool]]) -> list[tuple[str, str, bool]]:
    """(output key, source key, zero it) for every output tensor, in layer order."""
    by_layer: dict[int, list[str]] = {}
    top = []
    for key in reader.keys():
        m = _LAYER_KEY.match(key)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(m.group(2))
        else:
            top.append(key)
    head = [k for k in top if k.startswith("model.embed")]
    tail = [k for k in top if k not in head]
    out = [(k, k, False) for k in head]
    for j, (src, identity) in enumerate(plan):
        for rest in sorted(by_layer.get(src, [])):
            zero = identity and bool(_RESIDUAL_OUT.match(rest))
            out.append((f"model.layers.{j}.{rest}", f"model.layers.{src}.{rest}", zero))
    return out + [(k, k, False) for k in tail]


def upscale_depth(
    hf_dir: str | Path,
    out: str | Path,
    layers: int,
    scheme: str = "stack",
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> list[tuple[int, bool]]:
    """Write the up-scaled folder `out`; returns the layer plan (source layer, identity copy)."""
    hf_dir = Path(hf_dir)
    raw = read_hf_config(hf_dir)
    architecture(raw, f"{hf_dir}/config.json")
    plan = layer_plan(raw["num_hidden_layers"], layers, scheme)
    reader = HFReader(hf_dir)
    tensors = _tensor_plan(reader, plan)
    with atomic_dir(out, overwrite) as tmp:
        for f in hf_dir.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX:
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(_new_config(raw, plan), indent=2) + "\n")
        shapes = [(dst, reader.shape(src), reader.dtype(src)) for dst, src, _ in tensors]
        writer = ShardedWriter(tmp, shapes, max_shard_bytes)
        for dst, src, zero in tqdm(tensors, desc="upscale-depth", unit="tensor"):
            t = reader.get(src)
            writer.write(dst, t.zero_() if zero else t)
        writer.close()
    return plan
