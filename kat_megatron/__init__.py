"""kat_megatron: training stack for AutoThink (KAT-V1 style) reasoning models on Megatron-Core."""

__version__ = "0.1.0"
