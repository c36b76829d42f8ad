"""Relative cost of a training step for `kat plan`: FLOPs per GPU, pipeline bubble, communication.

Not a performance model: enough to rank layouts that fit. Sources:

- FLOPs: 2 x (matmul parameters) per token forward plus causal attention, 2 x 2 x (s/2) x a x d
  per token and layer (QK^T and PV over half the keys on average); backward is 2x forward;
  full recompute adds one forward, selective recompute the attention part of one (its `moe_act`
  part is elementwise and left out) (Narayanan
  et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters using
  Megatron-LM", arXiv:2104.04473, Sec. 5.1; Korthikanti et al. 2022, Sec. 6). The embedding is a
  lookup; the output layer runs once per MTP depth more.
- Bubble: (pp - 1) / (m * vpp) of the ideal compute time for m micro-batches per step
  (Narayanan et al. 2021, Sec. 2.2.1 and 2.2.2).
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
- Time: compute at `mfu` of `tflops`, plus a fixed `layer_overhead_ms` per layer and micro-batch
  (launch-bound kernels); communication at NVLink speed inside a node, InfiniBand
  across nodes (Megatron-Core rank order tp-cp-ep-dp-pp: a group is inside a node when its
  members' span fits one). kat runs TP, EP and DP communication without overlap by default
  (`parallel.overlap_grad_reduce=false`), so all of it counts.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    mfu: float = 0.45
    """Fraction of peak that matmuls reach."""
    nvlink_gbs: float = 400.0
    """Intra-node collective bandwidth per GPU, GB/s."""
    ib_gbs: float = 45.0
    """Inter-node bandwidth per GPU, GB/s."""
    layer_overhead_ms: float = 0.3
    """Fixed cost of one layer's forward + backward for one micro-batch on one GPU (~60 kernel
    launches and syncs), however small the work: what makes splitting a short sequence over
    TP or CP ranks cost something beyond communication."""


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
    """Estimated seconds per step (compute x (1 + bubble) + communication)."""


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


def _bw(span: int, gpus_per_node: int, hw: Hardware) -> float:
    """Bytes per second of a group whose members span `span` consecutive ranks."""
    return (hw.nvlink_gbs if span <= gpus_per_node else hw.ib_gbs) * 1e9


def _collective(size: int, nbytes: float) -> float:
    """Bytes one GPU sends in an all-gather / reduce-scatter / alltoall over `size` ranks."""
    return nbytes * (size - 1) / size if size > 1 else 0.0


def _layer_comm(
    model: ModelConfig, layout: Layout, opts: ActivationOptions, moe: bool
) -> tuple[float, float, float]:
    """(TP, EP, CP) bytes per GPU for one layer and one micro-batch, forward + backward."""
    tokens = opts.micro_batch * opts.seq_len / layout.cp
    act = tokens * model.hidden_size * opts.act_bytes
    ops = 4 + (4 if not moe or model.moe_shared_expert_intermediate_size else 0)
    ops *= 1.5 if opts.recompute == "full" else 1.0
    tp = _collective(layout.tp, act) * ops
    ep = 0.0
    if moe:
        routed = act / layout.tp * model.moe_router_topk
        ep = 4 * _collective(layout.ep, routed)
        ep += 4 * _collective(layout.etp_size, routed * layout.etp_size)
    kv = tokens * 2 * model.num_query_groups / layout.tp * model.head_dim * opts.act_bytes
    cp = 3 * (layout.cp - 1) * kv
    return tp, ep, cp


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
) -> StepCost:
    """Cost of one step on the busiest GPU; `grad_numel` = (dense, expert) DDP buffer sizes,
    reduced in `grad_bytes` per element (fp32: 4, `optimizer.grad_reduce_dtype=bf16`: 2).

    `flops`: `step_flops(model, batch, opts.recompute)` when the caller has it already.
    """
    m = batch.microbatches(layout)
    if flops is None:
        flops = step_flops(model, batch, opts.recompute)
    flops /= layout.world
    bubble = (layout.pp - 1) / (m * layout.chunks)
    pattern = layer_pattern(model)
    # The busiest pipeline stage sets the pace (uneven stages: the one with the most layers).
    counts = stage_layer_counts(model, layout)
    busiest = max(range(layout.pp), key=lambda r: counts[r])
    stage = [
        pattern[i] for vp in range(layout.chunks) for i in chunk_layers(model, layout, busiest, vp)
    ]
    tp = ep = cp = 0.0
    for kind in set(stage):
        n = stage.count(kind)
        t, e, c = _layer_comm(model, layout, opts, bool(kind))
        tp, ep, cp = tp + m * n * t, ep + m * n * e, cp + m * n * c
    dense, expert = grad_numel
    bytes_per = grad_bytes + 2 if distributed_optimizer else 2 * grad_bytes
    dp = _collective(layout.dp * layout.cp, dense * bytes_per)
    dp += _collective(layout.expert_dp, expert * bytes_per)
    tokens = opts.micro_batch * opts.seq_len / layout.cp / layout.tp
    pp = 2 * m * layout.chunks * tokens * model.hidden_size * opts.act_bytes if layout.pp > 1 else 0
    span_ep = layout.etp_size * layout.ep
    imbalance = counts[busiest] * layout.pp / model.num_layers  # 1 for an even split
    seconds = flops * imbalance / (hw.tflops * 1e12 * hw.mfu) * (1 + bubble)
    seconds += m * counts[busiest] * hw.layer_overhead_ms / 1e3
    seconds += tp / _bw(layout.tp, gpus_per_node, hw)
    seconds += ep / _bw(span_ep, gpus_per_node, hw)
    seconds += cp / _bw(layout.tp * layout.cp, gpus_per_node, hw)
    seconds += dp / _bw(layout.tp * layout.cp * layout.dp, gpus_per_node, hw)
    seconds += pp / _bw(layout.world, gpus_per_node, hw)
    return StepCost(flops, bubble, tp, ep, cp, dp, pp, seconds)
