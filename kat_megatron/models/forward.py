"""Forward-only passes over a (possibly TP/PP-sharded) model: full-vocabulary logits.

Used by `tools/dump_logits.py` (checkpoint parity across layouts) and conversion verification.
Runs Megatron-Core's schedule with `forward_only=True`, so pipeline stages exchange activations
as in training; the vocab-parallel logits are gathered over the TP group on the last stage.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


@torch.no_grad()
def forward_logits(model: list, tokens_bs: torch.Tensor) -> torch.Tensor | None:
    """Logits [batch, seq, padded_vocab] (fp32) on last-stage ranks; None on other stages."""
    b, s = tokens_bs.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)
    if torch.cuda.is_available():
        tokens_bs, position_ids = tokens_bs.cuda(), position_ids.cuda()

    def step(data_iterator, chunk):
        next(data_iterator)
        out = chunk(tokens_bs, position_ids, None)

        def collect(output, non_loss_data=True):
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
