"""Activation memory of one rank for `kat plan`: what a forward pass saves for backward.

Method of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198), Sec. 4: walk a layer op by op and add up the tensors autograd keeps
for the backward pass, then multiply by the micro-batches a pipeline stage holds at once. Their
closed form, s*b*h*(34 + 5*a*s/h) bytes per layer for GPT-3 (MHA, 4h GELU MLP, dropout, fp16),
does not fit this model family, so the walk is redone for the layers Megatron-Core 0.16.1 builds
from `kat_megatron.models.builder` (RMSNorm, GQA, RoPE, SwiGLU fused or not, MoE, no dropout).
Symbols: T = micro_batch * seq / CP tokens, T' = T / TP under sequence parallelism (the
residual stream is sharded over TP), beta bytes per activation element, a/g = query heads /
KV groups per TP rank, d head dim, f FFN width.

Per layer (bytes / beta): norms keep their input (local RMSNorm also its normalised value:
torch's composite RMSNorm); every linear layer keeps its input (QKV and FC1 keep the T' shard
and re-gather it in backward); attention keeps q, k, v and its output (`te`: fused/flash attention,
no s^2 term; `local`: Megatron's unfused DotProductAttention, which expands k and v to a heads
and keeps the b*a*s^2 softmax; with `model.attention: sdpa`, torch's fused SDPA: no s^2 term,
as under TE). MoE layers (alltoall dispatcher, dropless): each rank runs
N = T' * top_k * ETP * load tokens through its local experts (a balanced router gives load 1;
`moe_load_factor` is the assumed max/mean tokens per expert rank) and keeps their input (N*h) and
fp32 routing probabilities (N); the router keeps fp32 logits and probabilities (T'*E).

The MLP activation (`transformer/mlp.py`, `MLP.forward`; f is f/TP dense, f_e/ETP per expert):
- unfused SwiGLU (`model.swiglu_fusion: false`): `glu(y)` on the FC1 output y = [y1, y2] (2f)
  saves y1 (a view: y's 2f storage stays alive) for silu, silu(y1) (f) and y2 + glu_linear_offset
  (a new tensor, f) for the product, and FC2 saves the product (f): 5f. Experts then scale by the
  routing probability (`per_token_scale`): the multiply saves the product again and FC2 the
  scaled one: 6f.
- fused SwiGLU (Megatron-Core's `bias_swiglu_impl`, the default): `SwiGLUFunction` saves only
  its input y (2f) and FC2 its output (f): 3f. Experts use `weighted_bias_swiglu_impl`, whose
  `WeightedSwiGLUFunction` saves y and the probabilities (already counted) and returns the
  scaled product that FC2 saves: 3f as well.
- GELU (never fused here: Megatron-Core fuses a non-gated GELU only with a bias): its input and
  FC2's input, 2f (experts 3f).

Recompute: `selective` is Megatron-Core's `recompute_modules=["core_attn", "moe_act"]`: core
attention (drops the s^2 softmax on `local`, nearly nothing under fused attention) and, in MoE
layers, the expert activation function (keeps FC1's output, drops the SwiGLU intermediates and
the probability-scaled product; Megatron-Core allows it with grouped-GEMM experts, i.e. `te`); `full`
(uniform, one layer per checkpoint) keeps each layer's input (T'*h) and rebuilds one layer at a
time in backward. The last stage adds the output layer's input and the fp32 softmax of the
logits (T*V/TP*4 bytes; Megatron's vocab-parallel cross entropy) and each MTP depth (one more
layer, its norms and projection, and its own logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kat_megatron.config.schema import ModelConfig
from kat_megatron.models.builder import padded_vocab_size
from kat_megatron.planning.inventory import chunk_layers, layer_pattern
from kat_megatron.planning.layout import Layout

RECOMPUTE = ("none", "selective", "full")
BACKENDS = ("te", "local")


@dataclass(frozen=True)
class ActivationOptions:
    """Shape and settings of one micro-batch."""

    seq_len: int
    micro_batch: int = 1
    act_bytes: int = 2
    """Bytes per activation element (2 for bf16, 4 for fp32)."""
    recompute: str = "none"
    backend: str = "te"
    moe_load_factor: float = 1.0
    """Tokens on the busiest expert rank / mean (dropless routing; 1 = perfectly balanced)."""

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r}: expected one of {list(RECOMPUTE)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {list(BACKENDS)}")


@dataclass
class _Shape:
    tokens: float  # T: tokens of one micro-batch on this rank (after CP)
    tokens_sp: float  # T': residual-stream tokens (T / TP under SP)
    beta: int


def _shape(layout: Layout, opts: ActivationOptions) -> _Shape:
    tokens = opts.micro_batch * opts.seq_len / layout.cp
    return _Shape(tokens, tokens / layout.tp if layout.sp else tokens, opts.act_bytes)


def _attention(model: ModelConfig, layout: Layout, opts: ActivationOptions) -> dict[str, float]:
    sh = _shape(layout, opts)
    t, d, b = sh.tokens, model.head_dim, sh.beta
    a, g = model.num_attention_heads / layout.tp, model.num_query_groups / layout.tp
    out = {"attn_out": t * a * d * b}
    if getattr(model, "qk_layernorm", False):  # per-head q/k norms keep their inputs
        out["qk_norm"] = _norm_copies(model, opts) * t * (a + g) * d * b
    if opts.backend == "te":
        # QKV output (kept alive by v, a view of it), rotated q and k, fp32 softmax statistics.
        out["attn_qkv"] = t * ((a + 2 * g) + (a + g)) * d * b
        if opts.recompute == "none":
            out["attn_softmax_stats"] = opts.micro_batch * a * opts.seq_len / layout.cp * 4
        return out
    s = opts.seq_len  # the local backend has no context parallelism
    if getattr(model, "attention", "unfused") == "sdpa":
        # torch SDPA (models/attention.py): grouped k/v unexpanded, no s^2 term; its fused
        # kernel keeps the output and fp32 log-sum-exp statistics; local RoPE keeps its tables.
        out["attn_qkv"] = t * ((a + 2 * g) + (a + g)) * d * b
        if opts.recompute == "none":
            out["attn_softmax_stats"] = opts.micro_batch * a * s * 4
            out["rope"] = 4 * s * d * b
        return out
    if opts.recompute == "none" and a > g:  # GQA: q, k and v expanded to `a` heads
        out["attn_qkv"] = 3 * t * a * d * b
    else:  # rotated q, k and the QKV output kept alive by v (a view of it: MHA, or recompute)
        out["attn_qkv"] = t * ((a + 2 * g) + (a + g)) * d * b
    if opts.recompute == "none":
        out["attn_softmax"] = opts.micro_batch * a * s * s * b + s * s  # probs + causal mask
        out["rope"] = 4 * s * d * b
    return out


def _load(layout: Layout, opts: ActivationOptions) -> float:
    """Routing imbalance applies across expert ranks only: with EP = 1 every token is local."""
    return opts.moe_load_factor if layout.ep > 1 else 1.0


def _norm_copies(model: ModelConfig, opts: ActivationOptions) -> int:
    """Tensors a norm keeps: its input; torch's composite RMSNorm also the normalised value."""
    return 2 if opts.backend == "local" and model.normalization == "RMSNorm" else 1


def _norm(model: ModelConfig, opts: ActivationOptions, tokens_sp: float) -> float:
    return (_norm_copies(model, opts) * model.hidden_size * opts.act_bytes + 4) * tokens_sp


def _fp8(model: ModelConfig, opts: ActivationOptions) -> bool:
    """FP8 linear layers (`model.fp8`, Transformer Engine only)."""
    return model.fp8 is not None and opts.backend == "te"


def _mlp(
    model: ModelConfig, ffn: float, tokens: float, beta: int, expert: bool = False, fp8=False
) -> float:
    """Bytes the MLP activation and FC2 save (module docstring): unfused SwiGLU 5f (experts 6f),
    fused SwiGLU 3f (experts too), GELU 2f (experts 3f); with FP8 the f that FC2 saves is its
    1-byte quantized input."""
    if model.activation != "swiglu":
        widths = 3 if expert else 2
    elif model.swiglu_fused:
        widths = 3
    else:
        widths = 6 if expert else 5
    fc2_in = tokens * ffn * (1 if fp8 else beta)
    return tokens * ffn * (widths - 1) * beta + fc2_in


def layer_terms(
    model: ModelConfig, layout: Layout, opts: ActivationOptions, moe: bool
) -> dict[str, float]:
    """Bytes one transformer layer saves for backward for one micro-batch, by term."""
    sh = _shape(layout, opts)
    h, b, tp = model.hidden_size, sh.beta, layout.tp
    swiglu, fp8 = model.activation == "swiglu", _fp8(model, opts)
    if opts.recompute == "full":
        return {"layer_input": sh.tokens_sp * h * b}
    # QKV and FC1 keep their inputs, FP8 linear layers a 1-byte copy; the router (not FP8) its own
    fc1_in = 1 if fp8 and not moe else b
    out = {
        "norms": 2 * _norm(model, opts, sh.tokens_sp),
        "linear_inputs": sh.tokens_sp * h * ((1 if fp8 else b) + fc1_in),
    }
    out.update(_attention(model, layout, opts))
    if fp8:  # linear_proj's FP8 copy of the attention output, which attention keeps in bf16
        out["proj_input_fp8"] = sh.tokens * model.num_attention_heads / tp * model.head_dim
    if not moe:
        out["mlp"] = _mlp(model, model.ffn_hidden_size / tp, sh.tokens, b, fp8=fp8)
        return out
    e, k = model.num_moe_experts, model.moe_router_topk
    routed = sh.tokens_sp * k * layout.etp_size * _load(layout, opts)
    ffn_e = (model.moe_ffn_hidden_size or model.ffn_hidden_size) / layout.etp_size
    out["router"] = sh.tokens_sp * (3 * e * 4 + 2 * k * 12)
    # Experts scale their activation by the routing probability inside the expert MLP (the
    # fp32 probabilities: 4 bytes per routed token). Selective recompute's `moe_act`
    # (grouped-GEMM experts, so `te` only) keeps only FC1's output and rebuilds the rest.
    # With FP8, FC2's quantized input is its own tensor and survives the recompute of `moe_act`.
    if opts.recompute == "selective" and opts.backend == "te":
        act = routed * ffn_e * ((2 if swiglu else 1) * b + (1 if fp8 else 0))
    else:
        act = _mlp(model, ffn_e, routed, b, expert=True, fp8=fp8)
    out["experts"] = routed * (h * (1 if fp8 else b) + 4) + act
    shared = model.moe_shared_expert_intermediate_size
    if shared:
        out["shared_expert"] = _mlp(model, shared / tp, sh.tokens, b, fp8=fp8)
        if fp8:  # the shared expert's FC1 keeps its own FP8 copy of the normed input
            out["shared_expert"] += sh.tokens_sp * h
    return out


def in_flight(layout: Layout, pp_rank: int, microbatches: int) -> int:
    """Model-chunk forwards whose activations rank `pp_rank` holds at the peak of a step.

    Megatron-Core's `get_pp_rank_microbatches`: 1F1B warms up pp - r - 1 micro-batches and holds
    one more in steady state; interleaved warms up 2*(pp - r - 1) + (vpp - 1)*pp chunk forwards.
    """
    if layout.pp == 1:
        return 1
    if layout.vpp is None:
        return min(layout.pp - pp_rank, microbatches)
    warm = 2 * (layout.pp - pp_rank - 1) + (layout.vpp - 1) * layout.pp
    return min(warm + 1, microbatches * layout.vpp)


@dataclass
class ActivationMemory:
    """Activation bytes of one pipeline rank at its peak, by part."""

    layers: float = 0.0
    """Decoder layers of all in-flight micro-batches (and pipeline outputs)."""
    logits: float = 0.0
    """Output layer input and fp32 logits (last stage)."""
    mtp: float = 0.0
    """MTP depths: layer, norms, projection and logits (last stage)."""
    workspace: float = 0.0
    """Persistent buffers and the backward pass's transient peak."""
    terms: dict[str, float] = field(default_factory=dict)
    """Per-layer terms of one micro-batch (a MoE layer where there is one)."""

    @property
    def total(self) -> float:
        return self.layers + self.logits + self.mtp + self.workspace


def _per_chunk_layers(model: ModelConfig, layout: Layout, pp_rank: int, opts) -> list[float]:
    pattern = layer_pattern(model)
    cache = {m: sum(layer_terms(model, layout, opts, bool(m)).values()) for m in set(pattern)}
    return [
        sum(cache[pattern[i]] for i in chunk_layers(model, layout, pp_rank, vp))
        for vp in range(layout.chunks)
    ]


def _last_stage(model: ModelConfig, layout: Layout, opts: ActivationOptions) -> tuple[float, float]:
    """(logits bytes, MTP bytes) of one micro-batch on the last stage."""
    sh = _shape(layout, opts)
    h, b = model.hidden_size, sh.beta
    vocab = padded_vocab_size(model, layout.tp) / layout.tp
    logits = _norm(model, opts, sh.tokens_sp) + sh.tokens_sp * h * b + sh.tokens * vocab * 4
    depths = model.mtp_num_layers or 0
    if not depths:
        return logits, 0.0
    moe_last = bool(layer_pattern(model)[-1])
    layer = layer_terms(model, layout, replace(opts, recompute="none"), moe_last)
    head = 3 * _norm(model, opts, sh.tokens_sp) + 2 * sh.tokens_sp * h * b  # norms, eh_proj in
    return logits, depths * (sum(layer.values()) + head + logits)


def _workspace(model: ModelConfig, layout: Layout, opts: ActivationOptions, last: bool) -> float:
    """Persistent buffers plus the largest transient of a backward pass.

    Transients: the gradient of a layer's widest tensor and its partner (2x the FC1 output, dense
    or expert); `local` unfused attention's softmax backward (gradients of probabilities and scores,
    2 x b*a*s^2); on the last stage with 16-bit activations, the logits beside their fp32 copy.
    """
    sh = _shape(layout, opts)
    a = model.num_attention_heads / layout.tp
    vocab = padded_vocab_size(model, layout.tp) / layout.tp
    kinds = set(layer_pattern(model))
    transient = []
    if 0 in kinds:
        transient.append(2 * sh.tokens * 2 * model.ffn_hidden_size / layout.tp * sh.beta)
    if 1 in kinds:
        routed = sh.tokens_sp * model.moe_router_topk * layout.etp_size * _load(layout, opts)
        ffn_e = (model.moe_ffn_hidden_size or model.ffn_hidden_size) / layout.etp_size
        transient.append(2 * routed * max(2 * ffn_e, model.hidden_size) * sh.beta)
    persistent = 0.0
    if opts.backend == "local" and getattr(model, "attention", "unfused") != "sdpa":
        scores = opts.micro_batch * a * opts.seq_len**2 * sh.beta
        persistent = scores  # Megatron's global memory buffer for the attention scores
        transient.append(2 * scores)
    if last and sh.beta < 4:
        transient.append(sh.tokens * vocab * sh.beta)
    if opts.recompute == "full":  # one layer rebuilt at a time, with all its activations
        full = replace(opts, recompute="none")
        persistent += max(sum(layer_terms(model, layout, full, bool(k)).values()) for k in kinds)
    return persistent + max(transient)


def activation_memory(
    model: ModelConfig,
    layout: Layout,
    pp_rank: int,
    microbatches: int,
    opts: ActivationOptions,
) -> ActivationMemory:
    """Peak activation bytes of pipeline rank `pp_rank` during a training step."""
    sh = _shape(layout, opts)
    chunks = _per_chunk_layers(model, layout, pp_rank, opts)
    held = in_flight(layout, pp_rank, microbatches)
    per_chunk = sum(chunks) / len(chunks)
    layers = held * per_chunk
    last = pp_rank == layout.pp - 1
    if not last:  # stage outputs wait for their backward (deallocate_pipeline_outputs=False)
        layers += held * sh.tokens_sp * model.hidden_size * sh.beta
    logits, mtp = _last_stage(model, layout, opts) if last else (0.0, 0.0)
    terms = layer_terms(model, layout, opts, model.is_moe)
    return ActivationMemory(
        layers=layers,
        logits=logits,
        mtp=mtp,
        workspace=_workspace(model, layout, opts, last),
        terms=terms,
    )
