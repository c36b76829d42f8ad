"""SDPA core attention for the local backend: `kat train cfg.yaml model.attention=sdpa` (default).

`SDPAttention` is a drop-in `core_attention` for Megatron-Core's `SelfAttention` (the local layer
spec, `models/specs.py`): Megatron-Core's `DotProductAttention` constructor and forward, computed
with `torch.nn.functional.scaled_dot_product_attention`, so torch picks a fused kernel where it
has one (flash attention on CPU and CUDA) instead of materialising the [b, np, sq, sk] scores.
`model.attention=unfused` keeps `DotProductAttention` as the reference
(tests/models/test_attention.py checks the two agree).

Shapes (Megatron-Core's): query [sq, b, np, hn], key/value [sk, b, ng, hn] with np/ng heads and
query groups of this tensor-parallel rank (heads are sharded over TP before the core attention;
with sequence parallelism the sequence is already gathered); output [sq, b, np * hn]. GQA maps
query head i to group i // (np / ng), as `DotProductAttention`'s `repeat_interleave` does.

Masks (Megatron's convention: True = masked), mirroring `DotProductAttention`:
- No mask tensor, causal layer: sq == sk runs `is_causal=True` (no mask tensor at all); sq == 1
  (a KV-cached decode step) attends to every cached key; 1 < sq < sk (several new tokens against a
  cache) builds a bottom-right aligned causal mask [sq, sk] (query i sits at position sk - sq + i;
  torch's `is_causal` would align it top-left). As in `DotProductAttention`, the layer's own mask
  type decides; the forward's `attn_mask_type` (Megatron-Core's inference path switches it to
  `no_mask` after the prefill) is not needed to get decode right.
- A mask tensor ([b or 1, 1 or np, sq, sk] bool; SFT's packed rows, Megatron's inference path with
  `attention_backend=local`) replaces the causal rule, as in `DotProductAttention`. A query row
  masked everywhere gets what `DotProductAttention` gives it (its -10000 fill makes the softmax
  uniform: the mean of all values), never NaN and no gradient to q or k.
- `PackedSeqParams` (`qkv_format="thd"`: q [t, np, hn]; or [t, 1, np, hn]): one causal SDPA call
  per document, `cu_seqlens_q[i]:cu_seqlens_q[i + 1]` against the same slice of keys, so
  attention never crosses a document boundary. Chosen over a block-diagonal [t, t] mask: no mask
  memory at all (the dense alternative costs t^2 bytes per forward, and s^2 score memory in
  torch's math fallback), and sum(len_i^2) instead of t^2 score work. The cost: one host read of
  cu_seqlens per layer (as Megatron-Core's own thd RoPE does) and a Python loop over documents.
  With `cu_seqlens_*_padded`, document i starts at the padded offset and positions past its
  length are padding: their output is 0.

Softmax scale: `softmax_scale`, else 1/sqrt(kv_channels). `apply_query_key_layer_scaling`
divides the scores by the layer number in `DotProductAttention`'s matmul and multiplies back in
its fp32 softmax; the net scale is unchanged, and SDPA's kernels keep the softmax in fp32, so
the net scale is what is passed. Attention dropout applies in training only, drawn (as in
`DotProductAttention`) from the tensor-parallel RNG tracker unless sequence parallelism is on;
its masks differ from `DotProductAttention`'s (another kernel), its distribution does not.
Selective recompute (`core_attn`) reruns this module as it does the unfused one.

Not supported (a ValueError at build time names `model.attention=unfused` or TE): context
parallelism (as for `DotProductAttention`: it needs TE), sliding windows, softmax offsets
(`softmax_type` other than vanilla), an attention bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)


class SDPAttention(MegatronModule):
    """Core attention on `torch.nn.functional.scaled_dot_product_attention` (module docstring)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        _check_supported(config, layer_number)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type  # unused, as in DotProductAttention
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        self.hidden_size_per_attention_head = config.kv_channels
        self.softmax_scale = (
            1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """[sq, b, np, hn], [sk, b, ng, hn] x2 -> [sq, b, np * hn] (thd: [t, np * hn])."""
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        if packed_seq_params is not None:
            return self._packed(query, key, value, attention_mask, packed_seq_params)
        sq, b = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        out = self._attend(q, k, v, attention_mask)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    # ----------------------------------------------------------------------------- internals
    def _sdpa(self, q, k, v, **kw) -> torch.Tensor:
        dropout = self.dropout_p if self.training else 0.0
        args = dict(dropout_p=dropout, scale=self.softmax_scale, enable_gqa=q.size(1) != k.size(1))
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, **args, **kw)
        return F.scaled_dot_product_attention(q, k, v, **args, **kw)

    def _attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """q [b, np, sq, hn], k/v [b, ng, sk, hn] -> [b, np, sq, hn]."""
        sq, sk = q.size(2), k.size(2)
        if mask is None:
            if self.attn_mask_type not in CAUSAL_TYPES or sq == 1:
                return self._sdpa(q, k, v)
            if sq == sk:
                return self._sdpa(q, k, v, is_causal=True)
            if sq > sk:
                raise ValueError(f"SDPAttention: causal attention with {sq} queries, {sk} keys")
            allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            return self._sdpa(q, k, v, attn_mask=allowed)
        if mask.dtype != torch.bool:
            raise ValueError(f"SDPAttention: attention_mask must be bool (True = masked), got "
                             f"{mask.dtype}")  # fmt: skip
        dead = mask.all(dim=-1, keepdim=True)  # query rows with no key to attend to
        out = self._sdpa(q, k, v, attn_mask=~mask | dead)
        mean_v = v.mean(dim=2, keepdim=True)  # DotProductAttention's uniform softmax there
        if q.size(1) != v.size(1):
            mean_v = mean_v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        return torch.where(dead, mean_v, out)

    def _packed(self, query, key, value, mask, params: PackedSeqParams) -> torch.Tensor:
        """One causal call per document of a packed row (module docstring)."""
        if mask is not None:
            raise ValueError("SDPAttention: pass packed_seq_params or attention_mask, not both")
        thd = query.dim() == 3
        if not thd:
            if query.size(1) != 1:
                raise ValueError(f"SDPAttention: packed_seq_params describe one packed row "
                                 f"(batch 1), got batch {query.size(1)}")  # fmt: skip
            query, key, value = (x.squeeze(1) for x in (query, key, value))
        q_docs = _documents(params.cu_seqlens_q, params.cu_seqlens_q_padded)
        kv_docs = _documents(params.cu_seqlens_kv, params.cu_seqlens_kv_padded)
        if len(q_docs) != len(kv_docs):
            raise ValueError("SDPAttention: cu_seqlens_q and cu_seqlens_kv count different "
                             "documents")  # fmt: skip
        t, heads, hn = query.shape
        pieces, end = [], 0
        for (q0, q1), (k0, k1) in zip(q_docs, kv_docs):
            if q0 > end:  # padding between documents
                pieces.append(query.new_zeros(q0 - end, heads, hn))
            if q1 > q0:
                q, k, v = (x[a:z].transpose(0, 1).unsqueeze(0)
                           for x, a, z in ((query, q0, q1), (key, k0, k1), (value, k0, k1)))  # fmt: skip
                pieces.append(self._attend(q, k, v, None)[0].transpose(0, 1))
            end = q1
        if t > end:
            pieces.append(query.new_zeros(t - end, heads, hn))
        out = torch.cat(pieces).reshape(t, heads * hn)
        return out if thd else out.unsqueeze(1)


def _documents(cu: torch.Tensor, cu_padded: torch.Tensor | None) -> list[tuple[int, int]]:
    """(start, end) of each document's tokens in the packed row."""
    bounds = cu.tolist()
    starts = cu_padded.tolist()[:-1] if cu_padded is not None else bounds[:-1]
    return [(s, s + b - a) for s, a, b in zip(starts, bounds[:-1], bounds[1:])]


def _check_supported(config: TransformerConfig, layer_number: int) -> None:
    """ValueError (one line, what to change) for what SDPAttention does not implement."""
    if config.context_parallel_size != 1:
        raise ValueError(
            "context parallelism needs Transformer Engine attention: set parallel.cp=1 or "
            "model.backend=te"
        )
    if config.softmax_type != "vanilla":
        raise ValueError(
            f"softmax_type={config.softmax_type!r} is not supported by model.attention=sdpa; "
            "use model.attention=unfused"
        )
    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        raise ValueError(
            "sliding-window attention is not supported by model.attention=sdpa; use "
            "model.attention=unfused"
        )
