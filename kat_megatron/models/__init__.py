"""Model presets, layer specs and the Megatron-Core GPTModel builder."""
