"""Parameter counts of kat models: `kat model info PRESET|config.yaml` and docs/scaling.md.

`count_params(model)` counts analytically from a `ModelConfig` (no torch model is built);
`count_module_params(module)` groups the real `named_parameters()` of a Megatron-Core `GPTModel`
into the same components, so tests can check the formula against Megatron-Core exactly.

Formulas (h = hidden, L = layers, d = head dim, n_q / n_kv = query / KV heads, V = padded vocab,
f = dense FFN, f_e = expert FFN, f_s = shared-expert FFN, E = experts, k = top-k; a SwiGLU MLP
of width f has 3*h*f weights, a GELU one 2*h*f; a norm has h weights (RMSNorm) or 2h (LayerNorm)):

- embedding V*h; output layer V*h (0 when tied); final norm one norm.
- attention per layer: QKV weight h*(n_q + 2*n_kv)*d, QKV bias (n_q + 2*n_kv)*d, proj n_q*d*h.
- norms per layer: 2 (input and pre-MLP), plus q and k norms of width d with qk_layernorm.
- dense MLP per dense layer: 3*h*f. MoE per MoE layer: router E*h, routed experts E*3*h*f_e,
  shared expert 3*h*f_s.
- MTP per depth: enorm + hnorm + eh_proj (2h*h) + one transformer layer (MoE when the decoder's
  last layer is) + final norm; the output layer is shared with the main model.

Active parameters per token count every parameter except the E - k routed experts a token
does not use in each MoE layer. `active` is the main model's (MTP heads excluded, as at
inference); `active_with_mtp` adds the MTP heads' active parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from kat_megatron.config.schema import ModelConfig
from kat_megatron.models.builder import moe_layer_freq, padded_vocab_size

COMPONENTS = (
    "embedding",
    "output_layer",
    "attention_qkv",
    "attention_proj",
    "norms",
    "dense_mlp",
    "moe_router",
    "moe_routed_experts",
    "moe_shared_expert",
    "mtp",
)


def human(n: float) -> str:
    """40_565_560_320 -> '40.57B' (K, M, B, T)."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


@dataclass
class ParamCount:
    """Parameter counts per component (`total`) and per token (`active`), plus layer shapes."""

    components: dict[str, int]
    active_components: dict[str, int]
    vocab_size: int
    padded_vocab_size: int
    num_dense_layers: int
    num_moe_layers: int
    mtp_layers: int
    per_layer: dict[str, int] = field(default_factory=dict)
    """Parameters of one dense layer, one MoE layer and one MTP depth (when present)."""
    name: str = ""

    @property
    def total(self) -> int:
        """All parameters, MTP heads included (what `named_parameters()` of the model sums to)."""
        return sum(self.components.values())

    @property
    def total_without_mtp(self) -> int:
        return self.total - self.components["mtp"]

    @property
    def active(self) -> int:
        """Parameters used per token by the main model (MTP heads excluded)."""
        return sum(v for k, v in self.active_components.items() if k != "mtp")

    @property
    def active_with_mtp(self) -> int:
        return sum(self.active_components.values())

    def table(self) -> str:
        """A fixed-width table: component, total, active, share of total."""
        title = f"Parameters of {self.name}" if self.name else "Parameters"
        rows = [title, f"{'component':<20} {'total':>16} {'':>8} {'active':>16} {'':>8} {'%':>6}"]
        for key in COMPONENTS:
            tot, act = self.components[key], self.active_components[key]
            if not tot:
                continue
            pct = 100.0 * tot / self.total if self.total else 0.0
            rows.append(
                f"{key:<20} {tot:>16,} {human(tot):>8} {act:>16,} {human(act):>8} {pct:>6.2f}"
            )
        rows.append("-" * len(rows[1]))
        if self.components["mtp"]:
            rows.append(
                f"{'total without MTP':<20} {self.total_without_mtp:>16,} "
                f"{human(self.total_without_mtp):>8} {self.active:>16,} {human(self.active):>8}"
            )
        rows.append(
            f"{'total':<20} {self.total:>16,} {human(self.total):>8} "
            f"{self.active_with_mtp:>16,} {human(self.active_with_mtp):>8}"
        )
        rows.append(
            f"layers: {self.num_dense_layers} dense + {self.num_moe_layers} MoE"
            + (f", {self.mtp_layers} MTP" if self.mtp_layers else "")
            + f"; vocab {self.vocab_size:,} (padded {self.padded_vocab_size:,})"
        )
        rows.append(f"active per token (main model): {human(self.active)} of {human(self.total)}")
        return "\n".join(rows)


def _layer(model: ModelConfig, moe: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(total, active) per component of one transformer layer."""
    h, d = model.hidden_size, model.head_dim
    nq, nkv = model.num_attention_heads, model.num_query_groups
    norm = h * (2 if model.normalization == "LayerNorm" else 1)
    mlp_mult = 3 if model.activation == "swiglu" else 2
    qkv_out = (nq + 2 * nkv) * d
    tot = dict.fromkeys(COMPONENTS, 0)
    tot["attention_qkv"] = h * qkv_out + (qkv_out if model.add_qkv_bias else 0)
    tot["attention_proj"] = nq * d * h
    qk_norms = 2 * d * (2 if model.normalization == "LayerNorm" else 1) if model.qk_layernorm else 0
    tot["norms"] = 2 * norm + qk_norms  # input, pre-MLP (+ per-head q and k norms)
    act = dict(tot)
    if not moe:
        tot["dense_mlp"] = act["dense_mlp"] = mlp_mult * h * model.ffn_hidden_size
        return tot, act
    e, k = model.num_moe_experts, model.moe_router_topk
    expert = mlp_mult * h * (model.moe_ffn_hidden_size or model.ffn_hidden_size)
    tot["moe_router"] = act["moe_router"] = e * h
    tot["moe_routed_experts"], act["moe_routed_experts"] = e * expert, k * expert
    shared = model.moe_shared_expert_intermediate_size
    if shared:
        tot["moe_shared_expert"] = act["moe_shared_expert"] = mlp_mult * h * shared
    return tot, act


def moe_pattern(model: ModelConfig) -> list[int]:
    """1 for MoE layers, 0 for dense ones (the builder's `moe_layer_freq` expanded)."""
    freq = moe_layer_freq(model)
    if isinstance(freq, list):
        return freq
    return [1 if model.is_moe and i % freq == 0 else 0 for i in range(model.num_layers)]


def count_params(model: ModelConfig, name: str = "") -> ParamCount:
    """Analytic parameter counts of `model` (padded vocab at tp=1, as `build_model` builds)."""
    h = model.hidden_size
    norm = h * (2 if model.normalization == "LayerNorm" else 1)
    vocab = padded_vocab_size(model, 1)
    pattern = moe_pattern(model)
    tot = dict.fromkeys(COMPONENTS, 0)
    act = dict.fromkeys(COMPONENTS, 0)
    tot["embedding"] = act["embedding"] = vocab * h
    if model.untie_embeddings_and_output_weights:
        tot["output_layer"] = act["output_layer"] = vocab * h
    tot["norms"] = act["norms"] = norm  # final norm
    per_layer = {}
    for is_moe in (0, 1):
        n = pattern.count(is_moe)
        if not n:
            continue
        lt, la = _layer(model, bool(is_moe))
        per_layer["moe_layer" if is_moe else "dense_layer"] = sum(lt.values())
        for key in COMPONENTS:
            tot[key] += n * lt[key]
            act[key] += n * la[key]
    mtp = model.mtp_num_layers or 0
    if mtp:
        lt, la = _layer(model, bool(pattern[-1]))
        extra = 3 * norm + 2 * h * h  # enorm, hnorm, final norm, eh_proj
        per_layer["mtp_depth"] = extra + sum(lt.values())
        tot["mtp"] = mtp * per_layer["mtp_depth"]
        act["mtp"] = mtp * (extra + sum(la.values()))
    return ParamCount(
        components=tot,
        active_components=act,
        vocab_size=model.vocab_size,
        padded_vocab_size=vocab,
        num_dense_layers=pattern.count(0),
        num_moe_layers=pattern.count(1),
        mtp_layers=mtp,
        per_layer=per_layer,
        name=name or (model.preset or ""),
    )


def component_of(param_name: str) -> str:
    """The COMPONENTS entry of a Megatron-Core GPTModel parameter name."""
    parts = param_name.split(".")
    last = parts[-1]
    if parts[0] == "mtp":
        return "mtp"
    if parts[0] == "embedding":
        return "embedding"
    if parts[0] == "output_layer":
        return "output_layer"
    if "layernorm" in param_name or "layer_norm" in last:
        return "norms"  # input/pre-MLP/final norms, and TE's norms fused into linear layers
    if "router" in parts:
        return "moe_router"
    if "shared_experts" in parts:
        return "moe_shared_expert"
    if "experts" in parts:
        return "moe_routed_experts"
    if "linear_qkv" in parts:
        return "attention_qkv"
    if "linear_proj" in parts:
        return "attention_proj"
    if "mlp" in parts:
        return "dense_mlp"
    raise ValueError(f"cannot classify parameter {param_name!r}")


def count_module_params(module: torch.nn.Module | Iterable[torch.nn.Module]) -> dict[str, int]:
    """`numel()` of a GPTModel's (or a list of chunks') parameters per component, plus 'total'.

    Works on meta-device models; shared parameters (tied embeddings) are counted once.
    """
    modules = [module] if isinstance(module, torch.nn.Module) else list(module)
    out = dict.fromkeys(COMPONENTS, 0)
    seen: set[int] = set()
    for m in modules:
        for pname, p in m.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            out[component_of(pname)] += p.numel()
    out["total"] = sum(out[k] for k in COMPONENTS)
    return out
