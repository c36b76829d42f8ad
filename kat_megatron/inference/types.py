"""Types shared by the rollout engine, the RL trainer, `kat serve` and `kat eval`.

Pure data: no torch.distributed, no Megatron-Core imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    """How to sample continuations (the OpenAI / vLLM names where they exist)."""

    temperature: float = 1.0
    """0 means greedy (argmax); so does any value below `sampling.GREEDY_BELOW` (1e-5, as vLLM),
    where dividing the logits by it would overflow."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    max_new_tokens: int = 128
    stop_strings: list[str] = field(default_factory=list)
    """Generation of a sequence ends once its decoded continuation contains one of these; the
    returned text and tokens are cut after the stop string's token."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation of a sequence ends at one of these ids (the id is kept in `token_ids`)."""
    seed: int | None = None
    """Seed of the sampling generator (identical on every TP rank); None: from the engine."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: expected a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    """One generated continuation of one prompt."""

    prompt_ids: list[int]
    token_ids: list[int]
    """Generated ids only (not the prompt); includes the stop token when one ended it."""
    logprobs: list[float]
    """log p(token_ids[i] | prompt, token_ids[:i]) under the model's raw distribution
    (temperature 1, no top-k/top-p filtering): what the trainer recomputes for the ratio."""
    text: str
    """Decoded `token_ids` (special tokens kept)."""
    finish_reason: str
    """"stop" (stop token or string) or "length" (max_new_tokens reached)."""
    routing: Any = None
    """MoE router replay (`rl/router_replay.py`): the experts of every position the engine fed,
    `[layers, len(prompt_ids) + len(token_ids) - 1, top-k]`; None unless recorded."""
