"""Relative cost of a training step for `kat plan`: FLOPs per GPU, pipeline bubble, communication.

Not a performance model: enough to rank layouts that fit. Sources:

- FLOPs: 2 x (matmul parameters) per token forward plus causal attention, 2 x 2 x (s/2) x a x d
  per token and layer (QK^T and PV over half the keys on average); backward is 2x forward;
  full recompute adds one forward, selective recompute the attention part of one (its `moe_act`
  part is elementwise and left out) (Narayanan
  et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters using
  Megatron-LM", arXiv:2104.04473, Sec. 5.1; Korthikanti et al. 2022, Sec. 6). The embedding is a
  lookup; the output layer runs once per MTP depth more.
- Bubble: (pp - 1) / (m * vpp) of the time m micro-batches take on the stage, their exposed
  TP / EP / CP / PP communication and launch overhead included (Narayanan et al. 2021, Sec.
  2.2.1 and 2.2.2).
- TP with sequence parallelism: per layer and micro-batch, forward all-gathers and reduce-scatters
  of the T*h activation before/after attention and MLP (4 collectives forward, 4 backward, 2 more
  forward under full recompute), each moving (t-1)/t of its size per GPU (Korthikanti Sec. 4.2.2).
  MoE layers: attention's 4+4 plus the shared expert's; alltoall dispatch and combine (2 forward,
  2 backward) of T'*k*h over EP, and ETP all-gather/reduce-scatter of the routed tokens.
- CP: ring attention passes K and V chunks around the CP group, cp - 1 steps forward and again
  (with their gradients) in backward.
- DP: the distributed optimizer reduce-scatters the gradients (fp32, or bf16 with
  `optimizer.grad_reduce_dtype=bf16`) and all-gathers 16-bit parameters once per step; without
  it one all-reduce of the gradients (2x the data).
- Pace: the busiest pipeline stage, by forward FLOPs per token of its layers plus, on the last
  stage, the output layer (2·h·V, once more per MTP depth) and the MTP heads: a deep pipeline's
  last stage carries the vocabulary projection on top of its share of layers.
- Time (issue 20.3): each matmul runs at its own efficiency (`matmul_efficiency`), the pipeline
  bubble uses the micro-batches the layout really runs, m = global_batch / (DP x micro-batch),
  plus a fixed `layer_overhead_ms` per layer and micro-batch (launch-bound kernels).
  Communication runs at NVLink speed inside a node and InfiniBand across nodes (Megatron-Core
  rank order tp-cp-ep-dp-pp: a group is inside a node when its members' span fits one); an
  alltoall sends the share bound for peers on other nodes over InfiniBand while the rest moves
  over NVLink at the same time (`_alltoall_s`: the slower sets the time). Overlap assumptions:
  TP's forward collectives and the backward's output-gradient all-gather are exposed, the
  backward's input re-gather and gradient reduce-scatter hide behind the dgrad / wgrad GEMMs
  (two thirds of the compute; `_layer_comm`); EP alltoalls are exposed: kat does not turn on
  Megatron-Core's `tp_comm_overlap` (userbuffers) or `moe_a2a_overlap`; CP's ring
  exchange is hidden behind the attention blocks up to the attention compute time (Megatron-Core
  overlaps each K/V step with the previous block's attention). DP: Megatron-Core reduces
  gradients only in the last micro-batch's backward (the schedules run the others under
  `no_sync`), so with the distributed optimizer and `overlap_grad_reduce` on
  (`PlanOptions.overlap_grad_reduce`, kat's config `parallel.overlap_grad_reduce`) the
  reduce-scatter hides behind that one backward (2/3 of one micro-batch's compute; Megatron-
  Bridge's docs/performance-guide.md: "gradient ReduceScatters with the backward computation of
  the last micro-batch"), all but the last bucket's worth (`1 / dp_buckets` of it); off, all of
  it counts. The parameter all-gather after the optimizer step is exposed (kat does not set
  Megatron-Core's `overlap_param_gather`; it moves 2 bytes per parameter, 1 with
  `model.fp8_param`). So DP over InfiniBand is not free when the window, one micro-batch, is
  short. PP p2p: exposed without VPP (batched sends and
  receives); with VPP and `parallel.overlap_p2p_comm` (on by default there, as Megatron-Bridge
  sets it) the sends and receives run behind the next chunk's compute.
- Matmul efficiency: e(k) = `gemm_peak` x k / (k + `gemm_k0`), k the smallest dimension of the
  GEMM on one GPU (tokens per micro-batch T = b·s/CP, h, (n_q + 2 n_kv)·d / TP, f / TP, the
  expert width f_e / ETP, the tokens an expert receives T·EP·k / E, V / TP), FLOP-weighted
  harmonically over one layer's GEMMs; attention's QK^T / PV run at `attn_eff`. Anchors
  (assumptions, H100 SXM bf16 cuBLAS/TE): large square GEMMs reach ~0.75-0.8 of the 989 TFLOP/s
  peak (gemm_peak 0.8), a 2048-wide one ~0.7, a 768-wide one ~0.6, a 256-wide one 0.4
  (gemm_k0 = 256); flash attention forward + backward ~0.45 of peak. These are round values, not
  fitted; `--mfu` scales gemm_peak. With `model.fp8` every GEMM (the output layer's too, a
  simplification: Megatron-Core runs it in bf16) takes 1 / `fp8_gemm_speedup` (1.5) of its bf16
  time; attention and communication do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kat_megatron.config.schema import ModelConfig
from kat_megatron.models.builder import padded_vocab_size
from kat_megatron.models.params import count_params
from kat_megatron.planning.activations import ActivationOptions
from kat_megatron.planning.inventory import chunk_layers, layer_pattern, stage_layer_counts
from kat_megatron.planning.layout import Batch, Layout


@dataclass(frozen=True)
class Hardware:
    """Per-GPU speeds (defaults: H100 SXM, NVLink 4, one 400 Gb/s NIC per GPU)."""

    tflops: float = 989.0
    """Dense bf16 peak."""
    mfu: float = 0.8
    """`gemm_peak`: fraction of peak a large GEMM reaches (`kat plan --mfu`)."""
    gemm_k0: float = 256.0
    """GEMM size at which efficiency is half of `mfu` (e(k) = mfu * k / (k + gemm_k0))."""
    attn_eff: float = 0.45
    """Fraction of peak of fused (flash) attention, forward + backward."""
    nvlink_gbs: float = 400.0
    """Intra-node collective bandwidth per GPU, GB/s."""
    ib_gbs: float = 45.0
    """Inter-node bandwidth per GPU, GB/s."""
    layer_overhead_ms: float = 0.3
    """Fixed cost of one layer's forward + backward for one micro-batch on one GPU (~60 kernel
    launches and syncs), however small the work: what makes splitting a short sequence over
    TP or CP ranks cost something beyond communication."""
    dp_buckets: int = 8
    """Gradient buckets per step with overlap on: the last one's reduction stays exposed."""
    fp8_gemm_speedup: float = 1.5
    """With `model.fp8`, a GEMM's time is its bf16 time / this (attention and communication
    unchanged). H100's dense FP8 peak is 2x bf16; Megatron-Bridge's performance guide
    (docs/performance-guide.md, "Low Precision Training") reports FP8 linear layers give
    1.2-1.5x end to end; 1.5 on the GEMMs alone gives Llama-3-70B TP4 PP8 1.36x end to end."""


@dataclass
class StepCost:
    """Cost of one optimizer step on one GPU."""

    flops: float
    bubble: float
    """Idle fraction relative to the ideal compute time."""
    tp_bytes: float
    ep_bytes: float
    """Alltoall over EP plus ETP gathers of routed tokens."""
    cp_bytes: float
    dp_bytes: float
    pp_bytes: float
    step_s: float
    """Estimated seconds per step (compute x (1 + bubble) + exposed communication)."""
    efficiency: float = 0.0
    """FLOP-weighted matmul efficiency (fraction of peak) of the busiest stage's layers."""
    parts: dict[str, float] = field(default_factory=dict)
    """Seconds of `step_s` by term (compute, bubble, overhead, tp, ep, cp, dp, pp)."""


def step_flops(model: ModelConfig, batch: Batch, recompute: str) -> float:
    """Training FLOPs of one global batch (all GPUs together)."""
    counts = count_params(model)
    depths = model.mtp_num_layers or 0
    matmul = counts.active_with_mtp - counts.components["embedding"]
    matmul += depths * counts.components["output_layer"]
    if not model.untie_embeddings_and_output_weights:  # tied: the embedding is the output layer
        matmul += (1 + depths) * padded_vocab_size(model, 1) * model.hidden_size
    layers = model.num_layers + depths
    attn = 2 * 2 * (batch.seq_len / 2) * model.num_attention_heads * model.head_dim * layers
    tokens = batch.global_batch * batch.seq_len
    forward = tokens * (2 * matmul + attn)
    extra = {"none": 0.0, "selective": tokens * attn, "full": forward}[recompute]
    return 3 * forward + extra


def _gemm_eff(k: float, hw: Hardware) -> float:
    return hw.mfu * k / (k + hw.gemm_k0)


def _layer_parts(
    model: ModelConfig, layout: Layout, opts: ActivationOptions, moe: bool
) -> tuple[list[tuple[float, float]], float]:
    """One layer's GEMMs as (forward FLOPs per token, smallest GEMM dimension on one GPU), and
    its attention (QK^T, PV) FLOPs per token."""
    h, d, heads = model.hidden_size, model.head_dim, model.num_attention_heads
    tokens = opts.micro_batch * opts.seq_len / layout.cp
    qkv = (heads + 2 * model.num_query_groups) * d
    parts = [
        (2 * h * qkv, min(tokens, h, qkv / layout.tp)),
        (2 * heads * d * h, min(tokens, h, heads * d / layout.tp)),
    ]
    if moe:
        # each expert gets the routed tokens of its EP group's T' = T / TP shards (SP), ETP
        # all-gathers them: T' * ETP * EP * k / E
        k, fe = model.moe_router_topk, model.moe_ffn_hidden_size or model.ffn_hidden_size
        tokens_sp = tokens / layout.tp if layout.sp else tokens
        per_expert = tokens_sp * layout.etp_size * layout.ep * k / model.num_moe_experts
        parts.append((2 * 3 * h * fe * k, min(per_expert, h, fe / layout.etp_size)))
        shared = model.moe_shared_expert_intermediate_size
        if shared:
            parts.append((2 * 3 * h * shared, min(tokens, h, shared / layout.tp)))
    else:
        f = model.ffn_hidden_size
        parts.append((2 * 3 * h * f, min(tokens, h, f / layout.tp)))
    return parts, 2 * 2 * (opts.seq_len / 2) * heads * d


def matmul_efficiency(
    model: ModelConfig, layout: Layout, opts: ActivationOptions, moe: bool, hw: Hardware
) -> float:
    """Fraction of the bf16 peak one layer runs at for one micro-batch (module docstring): its
    GEMMs at e(smallest per-GPU dimension) (x `fp8_gemm_speedup` with `model.fp8`), attention at
    `attn_eff`, FLOP-weighted harmonically."""
    parts, attn = _layer_parts(model, layout, opts, moe)
    work = sum(f for f, _ in parts) + attn
    fp8 = hw.fp8_gemm_speedup if model.fp8 else 1.0  # FP8 GEMMs; attention stays bf16
    seconds = sum(f / (fp8 * _gemm_eff(k, hw)) for f, k in parts) + attn / hw.attn_eff
    return work / seconds


def _alltoall_s(nbytes: float, size: int, stride: int, gpus_per_node: int, hw: Hardware) -> float:
    """An alltoall in which each GPU sends `nbytes` to the other `size - 1` members of a group
    spaced `stride` ranks apart (EP: stride ETP): the share bound for members on other nodes
    crosses InfiniBand while the rest moves over NVLink at the same time (NCCL posts the sends
    to all peers together), so the slower of the two sets the time."""
    if size < 2:
        return 0.0
    per_node = max(1, min(size, gpus_per_node // stride))
    remote = (size - per_node) / (size - 1)
    return max(nbytes * remote / (hw.ib_gbs * 1e9), nbytes * (1 - remote) / (hw.nvlink_gbs * 1e9))


def _bw(span: int, gpus_per_node: int, hw: Hardware) -> float:
    """Bytes per second of a group whose members span `span` consecutive ranks."""
    return (hw.nvlink_gbs if span <= gpus_per_node else hw.ib_gbs) * 1e9


def _collective(size: int, nbytes: float) -> float:
    """Bytes one GPU sends in an all-gather / reduce-scatter / alltoall over `size` ranks."""
    return nbytes * (size - 1) / size if size > 1 else 0.0


def _layer_comm(
    model: ModelConfig, layout: Layout, opts: ActivationOptions, moe: bool
) -> tuple[float, float, float, float, float]:
    """(TP exposed, TP overlapped, EP alltoall, ETP, CP) bytes per GPU for one layer and one
    micro-batch,
    forward + backward (+ the recomputed forward: full recompute reruns every collective of the
    forward, selective the core attention and so its ring exchange).

    TP with SP, per block (attention; dense MLP or shared expert): forward all-gather and
    reduce-scatter (exposed); backward the all-gather of the output gradient (exposed), and
    the re-gather of the saved input shard and the reduce-scatter of its gradient, which
    Megatron-Core's and TE's linear layers run asynchronously behind the dgrad and wgrad GEMMs
    (overlapped)."""
    tokens = opts.micro_batch * opts.seq_len / layout.cp
    act = tokens * model.hidden_size * opts.act_bytes
    blocks = 1 + (1 if not moe or model.moe_shared_expert_intermediate_size else 0)
    full = opts.recompute == "full"
    one = _collective(layout.tp, act)
    tp_exposed = blocks * one * (3 + (2 if full else 0))
    tp_hidden = blocks * one * 2
    ep = etp = 0.0
    if moe:  # dispatch and combine forward, their gradients backward (and again recomputed)
        routed = act / layout.tp * model.moe_router_topk
        ep = 4 * _collective(layout.ep, routed) * (1.5 if full else 1.0)
        etp = 4 * _collective(layout.etp_size, routed * layout.etp_size) * (1.5 if full else 1.0)
    kv = tokens * 2 * model.num_query_groups / layout.tp * model.head_dim * opts.act_bytes
    cp = (3 + (1 if opts.recompute != "none" else 0)) * (layout.cp - 1) * kv
    return tp_exposed, tp_hidden, ep, etp, cp


def step_cost(
    model: ModelConfig,
    layout: Layout,
    batch: Batch,
    opts: ActivationOptions,
    grad_numel: tuple[int, int],
    gpus_per_node: int,
    hw: Hardware,
    distributed_optimizer: bool = True,
    flops: float | None = None,
    grad_bytes: int = 4,
    overlap_grad_reduce: bool = False,
    overlap_p2p_comm: bool = True,
) -> StepCost:
    """Cost of one step on the busiest GPU; `grad_numel` = (dense, expert) DDP buffer sizes,
    reduced in `grad_bytes` per element (fp32: 4, `optimizer.grad_reduce_dtype=bf16`: 2).

    `flops`: `step_flops(model, batch, opts.recompute)` when the caller has it already.
    `overlap_grad_reduce`: the gradient reduce-scatter overlapped with the last micro-batch's
    backward; `overlap_p2p_comm`: PP sends / receives behind compute with VPP (module docstring).
    """
    m = batch.microbatches(layout)
    if flops is None:
        flops = step_flops(model, batch, opts.recompute)
    flops /= layout.world
    bubble = (layout.pp - 1) / (m * layout.chunks)
    pattern = layer_pattern(model)
    # The busiest pipeline stage sets the pace: the most decoder work, the last stage's output
    # layer (and MTP heads) counted (`_stage_work`).
    counts = stage_layer_counts(model, layout)
    work = _stage_work(model, layout, opts, pattern)
    busiest = max(range(layout.pp), key=lambda r: work[r])
    stage = [
        pattern[i] for vp in range(layout.chunks) for i in chunk_layers(model, layout, busiest, vp)
    ]
    tp = tp_hidden = ep = etp = cp = 0.0
    inv_eff = 0.0  # layer-weighted 1 / efficiency
    for kind in set(stage):
        n = stage.count(kind)
        t, th, e, et, c = _layer_comm(model, layout, opts, bool(kind))
        tp, tp_hidden = tp + m * n * t, tp_hidden + m * n * th
        ep, etp, cp = ep + m * n * e, etp + m * n * et, cp + m * n * c
        inv_eff += n / matmul_efficiency(model, layout, opts, bool(kind), hw)
    eff = len(stage) / inv_eff
    dense, expert = grad_numel
    # DP: the gradient reduce-scatter (all-reduce without the distributed optimizer: twice the
    # bytes) and the distributed optimizer's parameter all-gather (16-bit, FP8 with
    # `model.fp8_param`), each over the same elements
    moved = _collective(layout.dp * layout.cp, dense) + _collective(layout.expert_dp, expert)
    rs = moved * (grad_bytes if distributed_optimizer else 2 * grad_bytes)
    ag = moved * ((1 if model.fp8_param else 2) if distributed_optimizer else 0)
    dp = rs + ag
    tokens = opts.micro_batch * opts.seq_len / layout.cp / layout.tp
    pp = 2 * m * layout.chunks * tokens * model.hidden_size * opts.act_bytes if layout.pp > 1 else 0
    imbalance = work[busiest] * layout.pp / sum(work)  # 1 without pipeline parallelism
    compute = flops * imbalance / (hw.tflops * 1e12 * eff)
    parts = {"compute": compute}
    parts["overhead"] = m * counts[busiest] * hw.layer_overhead_ms / 1e3
    # TP: the backward's re-gathers and reduce-scatters hide behind the dgrad and wgrad GEMMs
    # (two thirds of the layer compute), the rest is on the critical path
    tp_bw = _bw(layout.tp, gpus_per_node, hw)
    parts["tp"] = tp / tp_bw + max(0.0, tp_hidden / tp_bw - compute * 2 / 3)
    parts["ep"] = _alltoall_s(ep, layout.ep, layout.etp_size, gpus_per_node, hw)
    parts["ep"] += etp / _bw(layout.etp_size, gpus_per_node, hw)  # ETP stays inside a node
    # ring attention: each K/V step hides behind the attention block it feeds
    attn_s = compute * _attention_share(model, layout, opts, bool(stage[0]))
    parts["cp"] = max(0.0, cp / _bw(layout.tp * layout.cp, gpus_per_node, hw) - attn_s)
    parts["pp"] = pp / _bw(layout.world, gpus_per_node, hw)
    if overlap_p2p_comm and layout.chunks > 1:
        # interleaved 1F1B with overlap_p2p_comm: each send / receive runs behind the next
        # chunk's compute
        parts["pp"] = max(0.0, parts["pp"] - compute)
    # The bubble idles a stage for (pp - 1) / vpp micro-batch slots, each as long as a
    # micro-batch's whole critical path on that stage, its exposed communication included.
    parts["bubble"] = bubble * sum(parts.values())
    dp_bw = _bw(layout.tp * layout.cp * layout.dp, gpus_per_node, hw)
    rs_s, ag_s = rs / dp_bw, ag / dp_bw
    # Megatron-Core starts the reduce-scatters in the last micro-batch's backward (`no_sync`
    # for the others): they hide behind that one backward (2/3 of a micro-batch's compute), all
    # but the last bucket. The all-gather runs after the optimizer step, exposed (kat does not
    # set Megatron-Core's `overlap_param_gather`).
    if overlap_grad_reduce and distributed_optimizer:
        per_micro = (compute + parts["overhead"]) / m
        rs_s = max(rs_s / hw.dp_buckets, rs_s - per_micro * 2 / 3)
    parts["dp"] = rs_s + ag_s
    tp, ep = tp + tp_hidden, ep + etp
    return StepCost(flops, bubble, tp, ep, cp, dp, pp, sum(parts.values()), eff, parts)


def _stage_work(
    model: ModelConfig, layout: Layout, opts: ActivationOptions, pattern: list
) -> list[float]:
    """Forward FLOPs per token of each pipeline stage: its decoder layers, and on the last one
    the output layer (once per MTP depth more) and the MTP heads (embedding: a lookup)."""
    per_kind = {}
    for kind in set(pattern):
        parts, attn = _layer_parts(model, layout, opts, bool(kind))
        per_kind[kind] = sum(f for f, _ in parts) + attn
    out = []
    for r in range(layout.pp):
        layers = [i for vp in range(layout.chunks) for i in chunk_layers(model, layout, r, vp)]
        out.append(sum(per_kind[pattern[i]] for i in layers))
    depths = model.mtp_num_layers or 0
    h = model.hidden_size
    out[-1] += 2 * h * padded_vocab_size(model, 1) * (1 + depths)
    out[-1] += depths * (per_kind[pattern[-1]] + 2 * 2 * h * h)
    return out


def _attention_share(
    model: ModelConfig, layout: Layout, opts: ActivationOptions, moe: bool
) -> float:
    """Attention's share of one layer's FLOPs (what CP's ring exchange hides behind)."""
    parts, attn = _layer_parts(model, layout, opts, moe)
    return attn / (attn + sum(f for f, _ in parts))
