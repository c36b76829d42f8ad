"""Layer specs and the Megatron-Core GPTModel builder (the presets are `config/presets.py`)."""
