"""Distributed start-up (NCCL or gloo) and the CPU adaptation layer for Megatron-Core."""
