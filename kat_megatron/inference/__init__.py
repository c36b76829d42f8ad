"""Inference on Megatron-Core: the rollout engine, its loading from checkpoints, sampling, the
shared request/response types, and `kat serve` (OpenAI-compatible HTTP). Used by RL, eval, the
data pipelines (through `kat serve`) and the demo."""
