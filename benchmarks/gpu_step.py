"""Achieved TFLOP/s and MFU of kat-v1-40b-shaped layers on one GPU:

    python benchmarks/gpu_step.py [--layers 4] [--seq 4096] [--mbs 1] [--iters 10]
    python benchmarks/gpu_step.py --tiny          # CPU smoke run of the same code path

Builds `--layers` decoder layers with kat-v1-40b's shapes (hidden 5120, 40 heads, 8 KV groups,
FFN 27648, QKV bias, SwiGLU, RMSNorm, RoPE) through kat's builder with the local (torch) spec,
bf16, TP=1, and times forward+backward of one micro-batch. Model FLOPs per step follow
Megatron-LM's accounting (3x forward; attention scores counted for the full, non-causal matrix,
as Megatron-LM reports it). The bf16 matmul peak is measured in the same run (large square
GEMMs), so MFU = achieved / measured peak needs no datasheet number. Finishes within 5 minutes
on an H100/H200.
"""

from __future__ import annotations

import argparse
import time

import torch


def matmul_peak_tflops(dtype: torch.dtype, device: str, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_flops(layers: int, h: int, n_q: int, n_kv: int, d: int, f: int, s: int, b: int) -> float:
    """Model FLOPs of forward+backward for `layers` decoder layers (no embedding/logits)."""
    per_token_fwd = (
        2 * h * (n_q + 2 * n_kv) * d  # QKV
        + 2 * n_q * d * h  # output projection
        + 2 * 3 * h * f  # SwiGLU MLP
        + 2 * 2 * s * n_q * d  # QK^T and attention x V (full matrix)
    )
    return 3 * per_token_fwd * layers * s * b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="tiny shapes in fp32 (CPU smoke test)")
    args = p.parse_args()

    from kat_megatron.config import ModelConfig, ParallelConfig
    from kat_megatron.config.presets import get_preset
    from kat_megatron.models.builder import build_model, transformer_config
    from kat_megatron.parallel.init import initialize, shutdown

    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = get_preset("tiny-dense" if args.tiny else "kat-v1-40b")
    preset.update(num_layers=args.layers, backend="local")
    model_cfg = ModelConfig(**preset)
    seq = min(args.seq, 128) if args.tiny else args.seq
    precision = "fp32" if args.tiny or device == "cpu" else "bf16"
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    par = ParallelConfig()
    initialize(par, seed=0, model=model_cfg)
    cfg = transformer_config(model_cfg, par, precision)
    model = build_model(model_cfg, par, precision, config=cfg)[0]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    # Time the decoder block only: embedding and logits are not part of the per-layer figure.
    block = model.decoder
    h, s, b = model_cfg.hidden_size, seq, args.mbs
    x = torch.randn(s, b, h, device=device, dtype=dtype, requires_grad=True)
    rope = model.rotary_pos_emb(s)
    if device == "cuda":
        rope = rope.cuda()

    def fwd_bwd() -> None:
        out = block(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        out.float().pow(2).mean().backward()

    for _ in range(2):
        fwd_bwd()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        fwd_bwd()
    _sync(device)
    dt = (time.perf_counter() - t0) / args.iters
    flops = step_flops(
        args.layers,
        h,
        model_cfg.num_attention_heads,
        model_cfg.num_query_groups,
        model_cfg.head_dim,
        model_cfg.ffn_hidden_size,
        s,
        b,
    )
    achieved = flops / dt / 1e12
    peak = matmul_peak_tflops(dtype, device, 256 if args.tiny else 8192, 5 if args.tiny else 50)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    shape = "tiny-dense" if args.tiny else "kat-v1-40b"
    print(f"device: {name}; {args.layers} layers of {shape} shape; seq {s}; mbs {b}; {dtype}")
    print(f"forward+backward: {dt * 1e3:.1f} ms/iter; model FLOPs {flops / 1e12:.2f} TFLOP/iter")
    print(f"achieved: {achieved:.1f} TFLOP/s; measured matmul peak: {peak:.1f} TFLOP/s")
    print(f"MFU vs measured peak: {100 * achieved / peak:.1f}%")
    shutdown()


if __name__ == "__main__":
    main()
