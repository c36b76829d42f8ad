"""Dense -> MoE up-cycling: `kat convert upcycle-moe --mcore DIR --out DIR --experts E --topk K
[--granularity G] [--shared-expert] [--tp N --pp N --ep N]`.

The scheme is Megatron-Core's (`megatron/core/transformer/moe/upcycling_utils.py`, after
arXiv:2410.07524): with granularity G the dense FFN of width f is cut into G slices of width f/G
along its hidden units, and expert e holds slice e mod G of copy e div G; the router's rows are
random (seeded, std = init_method_std) and identical within each group of G experts, so a token
routed to one copy is routed to all its G slices. Two departures make ours exact rather than
approximate, so the up-cycled model computes the dense model's function at step 0:

- Only fc2 is scaled (by G). Megatron-Core scales fc1 and fc2 by G^(1/3) each, which is exact
  for a linear activation but not for SwiGLU (silu(s*x) != s*silu(x)). With top-K a multiple of
  G, each selected group's softmax weights sum with the others' to 1, and the G slices of a copy
  sum to the dense MLP: output = sum_groups w_group * G * (1/G-width slices summed) = MLP(x).
- With `--shared-expert` the shared expert is the whole dense MLP; its fc2 and every routed
  expert's fc2 are halved, so shared + routed = MLP(x). (Megatron-Core leaves it random.)

We apply it per canonical tensor, inside the importer (`UpcycleSource`), instead of calling
Megatron-Core's `upcycle_state_dict`, which needs both models built at one TP layout in memory
and assumes every layer is MoE. Top-K not a multiple of G is allowed but not function-preserving.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import torch

from kat_megatron.checkpoint.mapping import is_moe_layer, split_layer
from kat_megatron.checkpoint.sources import TensorSource
from kat_megatron.config.schema import ModelConfig

log = logging.getLogger(__name__)

_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")


@dataclass(frozen=True)
class UpcycleSpec:
    """The MoE an up-cycling produces."""

    experts: int
    topk: int
    granularity: int = 1
    """Slices per dense FFN (fine-grained experts of width ffn/G)."""
    shared_expert: bool = False
    """Add a shared expert holding the whole dense MLP."""
    first_k_dense: int = 0
    """Keep the first k layers dense."""
    seed: int = 0
    """Seed of the router initialisation."""


def upcycled_model(dense: ModelConfig, spec: UpcycleSpec) -> ModelConfig:
    """The MoE ModelConfig for `dense` up-cycled as `spec` (ValueError if it cannot be)."""
    if dense.is_moe:
        raise ValueError("upcycle-moe needs a dense checkpoint; this one is already MoE")
    if dense.mtp_num_layers:
        raise ValueError(
            f"upcycle-moe: the checkpoint has model.mtp_num_layers={dense.mtp_num_layers} MTP "
            "depths, which up-cycling does not convert; up-cycle the trunk (train or convert it "
            "with model.mtp_num_layers=null) and add MTP depths after"
        )
    g, f = spec.granularity, dense.ffn_hidden_size
    if g < 1 or f % g or spec.experts % g:
        raise ValueError(
            f"--granularity {g} must divide the FFN width {f} and --experts {spec.experts}"
        )
    if spec.topk % g:
        log.warning(
            "top-k %d is not a multiple of granularity %d: not function-preserving", spec.topk, g
        )
    return replace(
        dense,
        preset=None,
        num_moe_experts=spec.experts,
        moe_router_topk=spec.topk,
        moe_ffn_hidden_size=f // g,
        moe_shared_expert_intermediate_size=f if spec.shared_expert else None,
        moe_layer_freq=1,
        moe_first_k_dense=spec.first_k_dense,
    )


class UpcycleSource:
    """Canonical tensors of the up-cycled MoE, computed from a dense source on demand."""

    def __init__(self, dense: TensorSource, spec: UpcycleSpec) -> None:
        self.dense, self.spec = dense, spec
        self.model = upcycled_model(dense.model, spec)
        self.dtype = getattr(dense, "dtype", torch.float32)
        self.tokenizer = getattr(dense, "tokenizer", None)

    def _router(self, i: int) -> torch.Tensor:
        g, h = self.spec.granularity, self.model.hidden_size
        gen = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + i)
        rows = torch.randn(self.spec.experts // g, h, generator=gen) * self.model.init_method_std
        return rows.repeat_interleave(g, dim=0).to(self.dtype)

    def get(self, name: str) -> torch.Tensor:
        i, rest = split_layer(name)
        if i is None or not is_moe_layer(self.model, i):
            return self.dense.get(name)
        g = self.spec.granularity
        half = 0.5 if self.spec.shared_expert else 1.0
        p = f"decoder.layers.{i}.mlp."
        if rest == "mlp.router.weight":
            return self._router(i)
        if rest.startswith("mlp.shared_experts."):
            t = self.dense.get(p + rest.removeprefix("mlp.shared_experts."))
            return t * half if rest.endswith("linear_fc2.weight") else t
        m = _EXPERT_RE.match(rest)
        if not m:
            return self.dense.get(name)
        piece = int(m.group(1)) % g
        if m.group(2) == "2":
            return self.dense.get(p + "linear_fc2.weight").chunk(g, dim=1)[piece] * (g * half)
        fc1 = self.dense.get(p + "linear_fc1.weight")
        halves = fc1.chunk(2, dim=0) if self.model.activation == "swiglu" else (fc1,)
        return torch.cat([x.chunk(g, dim=0)[piece] for x in halves])
