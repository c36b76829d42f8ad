"""The MTP heads of an export: `kat convert mcore-to-hf` writes them to `OUT/mtp/`, `hf-to-mcore`
reads them back (bit-exact), `kat convert verify` checks their logits.

A checkpoint with `model.mtp_num_layers = D` exports as a stock Hugging Face folder (Qwen2 or
Qwen3-MoE: what transformers and vLLM load, with no MTP) plus a subfolder:

    OUT/mtp/config.json         {"format": "kat-mtp", "version": 1, "num_nextn_predict_layers": D,
                                 "mtp_loss_scaling_factor": ..., "architecture": ...,
                                 "moe": true|false, "shared_with_main": [...]}
    OUT/mtp/model.safetensors   (or shards + model.safetensors.index.json), tensors
                                 `mtp.layers.k.*` for k = 0..D-1 (names: checkpoint/mapping.py)

The tensors of depth k use DeepSeek-V3's names for its MTP module (`enorm`, `hnorm`,
`eh_proj`, `shared_head.norm`, then the decoder layer's own HF names), under `mtp.layers.k.`
instead of DeepSeek-V3's `model.layers.{L+k}.`; the embedding and `lm_head` are the main
model's (not copied). Why a subfolder: transformers reads only `model.safetensors` or the files
its index lists, but vLLM loads every `*.safetensors` of a folder without an index, and an
unknown `mtp.*` tensor stops its Qwen2 loader; one level down, both ignore it.

Depth k computes (Megatron-Core's `MultiTokenPredictionLayer`, which `mtp_reference_logits`
re-implements with transformers' modules as the independent reference):

    ids_k   = ids_{k-1} shifted left by one, the last position filled with token 0 (ids_{-1} = ids)
    x       = eh_proj(cat([enorm(embed(ids_k)), hnorm(h_{k-1})], -1))     # [b, s, 2h] -> h
    h_k     = shared_head.norm(decoder_layer(x))    # RoPE positions 0..s-1, causal attention
    logits_k = lm_head(h_k)                         # predicts token t + k + 2 at position t

with `h_{-1}` the main model's last hidden state after its final norm.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from kat_megatron.config.schema import ModelConfig

MTP_DIR = "mtp"
FORMAT = "kat-mtp"
VERSION = 1
_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")


def mtp_config(model: ModelConfig, arch: str, moe: bool) -> dict[str, Any]:
    """The `mtp/config.json` of an export of `model` as `arch`."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "num_nextn_predict_layers": model.mtp_num_layers,
        "mtp_loss_scaling_factor": model.mtp_loss_scaling_factor,
        "architecture": arch,
        "moe": moe,
        "shared_with_main": ["model.embed_tokens.weight", "lm_head.weight"],
        "layout": "mtp.layers.k.{enorm,hnorm,eh_proj,shared_head.norm} + decoder-layer names",
    }


def read_mtp_config(hf_dir: str | Path) -> dict[str, Any] | None:
    """`hf_dir/mtp/config.json` checked, or None when the folder has no MTP heads."""
    path = Path(hf_dir) / MTP_DIR / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if cfg.get("format") != FORMAT or cfg.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {cfg.get('format')!r} version {cfg.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION} (written by kat convert mcore-to-hf)"
        )
    depth = cfg.get("num_nextn_predict_layers")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"{path}: num_nextn_predict_layers must be an integer >= 1, got {depth!r}")
    return cfg


def _rolled(ids: torch.Tensor) -> torch.Tensor:
    """Megatron-Core's `roll_tensor(ids, -1)`: shift left by one, the last column token 0."""
    out = torch.roll(ids, -1, dims=-1)
    out[..., -1] = 0
    return out


def _depth_model(hf_dir: Path, main, reader, k: int, moe: bool, tmp: Path):
    """A one-layer model of the main architecture whose layer and final norm are MTP depth k's
    (built through `from_pretrained`, so transformers' own weight loading places them)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = AutoConfig.from_pretrained(str(hf_dir)).to_dict()
    raw.update(num_hidden_layers=1, layer_types=None)
    if "mlp_only_layers" in raw:
        raw.update(mlp_only_layers=[] if moe else [0], decoder_sparse_step=1)
    cfg = type(main.config).from_dict(raw)
    prefix = f"mtp.layers.{k}."
    tensors = {"model.embed_tokens.weight": main.model.embed_tokens.weight.detach().clone()}
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = main.lm_head.weight.detach().clone()
    for key in reader.keys():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest == "shared_head.norm.weight":
            tensors["model.norm.weight"] = reader.get(key)
        elif rest not in _OWN:
            tensors[f"model.layers.0.{rest}"] = reader.get(key)
    out = tmp / f"depth{k}"
    out.mkdir()
    cfg.save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager"
    ).eval()


@torch.no_grad()
def mtp_reference_logits(
    hf_dir: str | Path, batches: list[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """transformers' fp32 logits of every MTP depth: per batch, D tensors [b, s, vocab]
    (the computation in the module docstring)."""
    from transformers import AutoModelForCausalLM

    from kat_megatron.checkpoint.hf_io import HFReader

    hf_dir = Path(hf_dir)
    cfg = read_mtp_config(hf_dir)
    if cfg is None:
        raise ValueError(f"{hf_dir}: no {MTP_DIR}/config.json (the export has no MTP heads)")
    main = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    reader = HFReader(hf_dir / MTP_DIR)
    eps = main.config.rms_norm_eps
    norm_cls = type(main.model.norm)
    with tempfile.TemporaryDirectory() as tmp:  # the depth models' folders, while they run
        depths = []
        for k in range(cfg["num_nextn_predict_layers"]):
            layer = _depth_model(hf_dir, main, reader, k, cfg["moe"], Path(tmp))
            norms = []
            for which in ("enorm", "hnorm"):
                norm = norm_cls(main.config.hidden_size, eps=eps)
                norm.weight.copy_(reader.get(f"mtp.layers.{k}.{which}.weight"))
                norms.append(norm)
            depths.append((layer, *norms, reader.get(f"mtp.layers.{k}.eh_proj.weight")))
        return [_heads(main, depths, tokens) for tokens in batches]


def _heads(main, depths: list, tokens: torch.Tensor) -> list[torch.Tensor]:
    ids = tokens
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    hidden = main.model(input_ids=ids, position_ids=positions).last_hidden_state
    heads = []
    for layer, enorm, hnorm, eh_proj in depths:
        ids = _rolled(ids)
        x = torch.cat([enorm(main.model.embed_tokens(ids)), hnorm(hidden)], dim=-1)
        x = torch.nn.functional.linear(x, eh_proj)
        hidden = layer.model(inputs_embeds=x, position_ids=positions).last_hidden_state
        heads.append(layer.lm_head(hidden).float())
    return heads
