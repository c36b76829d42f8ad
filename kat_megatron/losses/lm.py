"""Language-model loss for `kat train` (stage pretrain/sft): masked token cross-entropy.

Megatron-Core's `GPTModel` returns per-token losses `loss_bs` ([batch, seq], fp32, computed with
the vocab-parallel cross-entropy). We reduce them to a *sum* and a token *count*; the pipeline
schedule and `finalize_model_grads` (with `calculate_per_token_loss`) divide by the global token
count, so the gradient is the token-mean over the whole global batch whatever the DP/PP layout.
"""

from __future__ import annotations

import torch


def masked_token_loss(
    loss_bs: torch.Tensor, loss_mask_bs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of per-token losses where `loss_mask_bs` is 1, and the number of such tokens.

    Returns `(loss_sum, num_tokens, metrics)`; `metrics["lm_loss"]` is `[loss_sum, num_tokens]`
    (detached) so that the training loop can average it over micro-batches and DP ranks.
    """
    if loss_bs.shape != loss_mask_bs.shape:
        raise ValueError(f"loss {tuple(loss_bs.shape)} vs mask {tuple(loss_mask_bs.shape)}")
    mask = loss_mask_bs.to(loss_bs.dtype)
    loss_sum = (loss_bs.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int64)
    report = torch.stack([loss_sum.detach(), num_tokens.to(loss_sum.dtype)])
    return loss_sum, num_tokens, {"lm_loss": report}
