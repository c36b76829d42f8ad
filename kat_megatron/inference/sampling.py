"""Token sampling for the rollout engine: temperature, top-k, top-p, per-request seeds, stops.

`python -c "import torch; from kat_megatron.inference.sampling import *; from kat_megatron.inference.types import
SamplingParams as P; print(sample_tokens_b(torch.randn(2, 8), P(top_k=3, seed=0),
request_generators(0, 2)))"` samples two tokens.

Pure torch, no torch.distributed: the engine calls these with the same inputs on every TP rank.
Order of the filters (as vLLM): temperature, then top-k, then top-p on the tempered distribution.
`temperature < GREEDY_BELOW` (1e-5, vLLM's threshold) or `top_k == 1` is greedy (argmax; ties go to the lowest id). Sampling draws one
uniform number per request from that request's own generator and inverts the CDF, so a request's
tokens depend only on its seed and its logits, not on which other requests share its batch.
The log-probs recorded for the trainer are *not* these filtered ones: see `token_logprobs_b`.
"""

from __future__ import annotations

import hashlib

import torch

from kat_megatron.inference.types import SamplingParams

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (logits / 1e-300 would overflow to inf and NaN)."""


def request_seed(seed: int, index: int) -> int:
    """The generator seed of request `index` of a call seeded with `seed` (63-bit, stable)."""
    digest = hashlib.sha256(f"kat-rollout/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def request_generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per request, seeded by `request_seed(seed, i)`."""
    return [torch.Generator().manual_seed(request_seed(seed, i)) for i in range(n)]


def mask_vocab_bv(logits_bv: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """`logits_bv` with the padded columns (ids >= vocab_size) set to -inf (a new tensor)."""
    logits_bv = logits_bv.float().clone()
    if vocab_size is not None and vocab_size < logits_bv.shape[-1]:
        logits_bv[:, vocab_size:] = float("-inf")
    return logits_bv


def filtered_logits_bv(
    logits_bv: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Tempered logits with everything outside top-k / top-p set to -inf (temperature > 0).

    top-k keeps the tokens whose logit is >= the k-th largest; top-p keeps the smallest prefix
    of the tokens sorted by probability whose mass reaches `top_p` (always at least one token).
    """
    assert temperature > 0, "greedy decoding does not filter"
    out = logits_bv.float() / temperature
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_bv, order_bv = torch.sort(out, dim=-1, descending=True)
        probs_bv = torch.softmax(sorted_bv, dim=-1)
        mass_before_bv = probs_bv.cumsum(-1) - probs_bv
        drop_sorted_bv = mass_before_bv >= top_p
        drop_sorted_bv[:, 0] = False
        drop_bv = torch.zeros_like(drop_sorted_bv).scatter(1, order_bv, drop_sorted_bv)
        out = out.masked_fill(drop_bv, float("-inf"))
    return out


def sample_tokens_b(
    logits_bv: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator],
    vocab_size: int | None = None,
) -> torch.Tensor:
    """One token id per row of `logits_bv` [b, v] (long, [b]); ids >= vocab_size never come out.

    Every generator advances by exactly one draw per call when sampling (none when greedy).
    """
    logits_bv = mask_vocab_bv(logits_bv, vocab_size)
    if params.temperature < GREEDY_BELOW or params.top_k == 1:
        return logits_bv.argmax(dim=-1)
    probs_bv = torch.softmax(
        filtered_logits_bv(logits_bv, params.temperature, params.top_k, params.top_p), dim=-1
    )
    cdf_bv = probs_bv.double().cumsum(-1)
    u_b = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    u_b = u_b.to(cdf_bv.device) * cdf_bv[:, -1]
    ids_b = torch.searchsorted(cdf_bv, u_b.unsqueeze(1), right=True).squeeze(1)
    return ids_b.clamp(max=logits_bv.shape[-1] - 1)


def token_logprobs_b(logits_bv: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """log p(ids_b) under the raw model distribution (fp32 log-softmax over all columns of the
    padded vocabulary, temperature 1, no filtering): what the trainer recomputes."""
    logp_bv = torch.log_softmax(logits_bv.float(), dim=-1)
    return logp_bv.gather(1, ids_b.unsqueeze(1)).squeeze(1)


class StopStrings:
    """Detects stop strings in a growing continuation by decoding only its tail.

    A stop string of L characters spans at most 4 L byte-level tokens (each token holds at least
    one byte, each character at most four), so decoding the last `4 * L + 4` tokens after each
    new token finds a stop string in the step that completes it.
    """

    def __init__(self, tokenizer, stop_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.stops)

    def hit(self, token_ids: list[int]) -> bool:
        """True when the decoded tail of `token_ids` contains a stop string."""
        if not self.stops:
            return False
        tail = self.tokenizer.decode(token_ids[-self.window :])
        return any(s in tail for s in self.stops)


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    """`text` up to (not including) the earliest stop string (OpenAI `stop` semantics)."""
    cut = min((i for s in stop_strings if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
