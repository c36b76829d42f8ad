"""Forward passes over a (possibly TP/PP-sharded) model: logits of the main head and MTP heads.

- `model_heads(model, batch)`: a Megatron-Core `GPTModel` run to the hidden states its output
  layer sees, then that output layer on the main head and on every MTP depth: one `[s, b, V/tp]`
  logits tensor per head, still sharded over the vocabulary (nothing is gathered). Stage kd's
  student and teacher use it. With `batch["thd"]` (`kd.packing`: `packed_seq.eod_rows`) the
  model runs on that THD row and the heads come back in the rows' `[s, b, V/tp]` layout.
- `forward_logits(model, tokens, heads=False)`: full-vocabulary logits, forward only. Used by
  `tools/dump_logits.py` (checkpoint parity across layouts) and `kat convert verify`. Runs
  Megatron-Core's schedule with `forward_only=True`, so pipeline stages exchange activations as
  in training; the vocab-parallel logits are gathered over the TP group on the last stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.utils import unwrap_model

from kat_megatron.models.packed_seq import unpack_heads


@contextlib.contextmanager
def hidden_states_out(gpt) -> Iterator[None]:
    """Let one `GPTModel.forward` return the hidden states its output layer would get.

    Megatron-Core 0.16.1's `GPTModel._postprocess` runs the MTP block (the main and every
    depth's hidden states concatenated on dim 0), then returns them when `post_process` is
    False; with it set, MTP logits only ever become an internal cross-entropy. Clearing the
    flag for the call keeps the whole forward as Megatron-Core runs it up to the output layer
    (tests/training/test_kd_stage.py checks the heads against Megatron-Core's own MTP loss).
    """
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def model_heads(model, batch: dict, max_heads: int | None = None):
    """`(output, logits)`: `output` is the tensor the pipeline schedule passes on; `logits` the
    `[s, b, V/tp]` logits of heads d = 0..D (main head, MTP depths) on the last pipeline stage
    (at most `max_heads`), None on the other stages."""
    gpt = unwrap_model(model)
    thd = batch.get("thd")  # stage kd's THD row (`packed_seq.eod_rows`), or None
    inputs = thd or batch
    with hidden_states_out(gpt):
        hidden = model(
            inputs["tokens"],
            inputs["position_ids"],
            batch.get("attention_mask"),
            packed_seq_params=inputs.get("packed_seq_params"),
        )
    if not gpt.post_process:
        return hidden, None
    depth = gpt.config.mtp_num_layers or 0
    chunks = torch.chunk(hidden, 1 + depth, dim=0)[:max_heads]
    weight = None
    if gpt.share_embeddings_and_output_weights:
        weight = gpt.shared_embedding_or_output_weight()
    logits = [gpt.output_layer(h, weight=weight)[0] for h in chunks]
    if thd is not None:
        logits = [unpack_heads(x, thd["rows"]) for x in logits]
    return hidden, logits


@torch.no_grad()
def forward_logits(
    model: list, tokens_bs: torch.Tensor, heads: bool = False
) -> torch.Tensor | None:
    """Logits [batch, seq, padded_vocab] (fp32) on last-stage ranks; None on other stages.
    `heads=True`: every head's, [1 + D, batch, seq, padded_vocab] (main head first, then the
    D MTP depths; `model_heads`)."""
    b, s = tokens_bs.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)
    if torch.cuda.is_available():
        tokens_bs, position_ids = tokens_bs.cuda(), position_ids.cuda()

    def step(data_iterator, chunk):
        next(data_iterator)
        if heads:
            batch = {"tokens": tokens_bs, "position_ids": position_ids}
            out, logits = model_heads(chunk, batch)
        else:
            out = chunk(tokens_bs, position_ids, None)

        def collect(output, non_loss_data=True):
            if heads:  # [s, b, v/tp] per head
                full = [gather_from_tensor_model_parallel_region(x) for x in logits]
                return torch.stack([x.transpose(0, 1) for x in full]).float().cpu()
            # output: [b, s, v/tp] on the last stage
            return gather_from_tensor_model_parallel_region(output).float().cpu()

        return out, collect

    for chunk in model:
        chunk.eval()
    iters = [iter([None]) for _ in model]
    outputs = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iters if len(iters) > 1 else iters[0],
        model=model,
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
        collect_non_loss_data=True,
    )
    for chunk in model:
        chunk.train()
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs[0]
