"""Conversion time and peak memory against transformers' own load-and-save:

    .venv/bin/python benchmarks/convert.py [--gb 2] [--workdir /tmp/kat_convert_bench]

Writes a random Qwen2 checkpoint of about `--gb` GB (bf16, sharded safetensors), then runs each
case in a fresh process and reads its wall time and peak resident memory (ru_maxrss from wait4):

- baseline: `AutoModelForCausalLM.from_pretrained` + `torch.save(model.state_dict())`;
- `kat convert hf-to-mcore` (streaming, one process; the default), the same with `--ranks`
  (builds and fills our model: holds it once), and `kat convert mcore-to-hf` (streaming);
- `imports only`: the interpreter with torch, transformers and Megatron-Core imported, the floor
  under every kat case.

Prints one line per case and the ratios kat / baseline. Streaming cases should peak near the
imports-only floor plus a few of the largest tensors, independent of the model size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
torch.save(m.state_dict(), sys.argv[2])
"""

IMPORTS = "import transformers, kat_megatron.checkpoint.stream_writer, kat_megatron.cli"


def make_checkpoint(path: Path, gb: float) -> dict:
    """A random bf16 Qwen2 of about `gb` GB written tensor by tensor (never all in memory)."""
    import torch
    from transformers import Qwen2Config

    from kat_megatron.checkpoint.hf_config import QWEN2, HFSpec, hf_config_for
    from kat_megatron.checkpoint.hf_io import ShardedWriter
    from kat_megatron.checkpoint.mapping import hf_shapes
    from kat_megatron.config.schema import ModelConfig

    h, ffn, vocab = 2048, 5632, 32000
    qkv = h + 2 * 512  # 16 heads of 128, 4 KV groups
    per_layer = h * qkv + qkv + h * h + 3 * h * ffn + 2 * h
    layers = max(1, int((gb * 1e9 / 2 - 2 * vocab * h) // per_layer))
    model = ModelConfig(preset=None, num_layers=layers, hidden_size=h, num_attention_heads=16,
                        num_query_groups=4, ffn_hidden_size=ffn, vocab_size=vocab)  # fmt: skip
    spec = HFSpec(QWEN2, qkv_bias=True, o_bias=False)
    shapes = hf_shapes(model, spec)
    path.mkdir(parents=True)
    writer = ShardedWriter(path, [(k, s, torch.bfloat16) for k, s in shapes.items()], 2**30)
    g = torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        writer.write(key, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    writer.close()
    cfg = hf_config_for(model, spec, torch.bfloat16)
    assert isinstance(cfg, Qwen2Config)
    cfg.save_pretrained(str(path))
    largest = max(math.prod(s) for s in shapes.values()) * 2
    return {"layers": layers, "bytes": writer.total_size, "largest_tensor_bytes": largest}


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of `cmd` run as a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.0, help="checkpoint size (bf16)")
    p.add_argument("--workdir", default="/tmp/kat_convert_bench")
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    info = make_checkpoint(work / "hf", args.gb)
    print(json.dumps({"checkpoint": info}))
    py, kat = sys.executable, [sys.executable, "-m", "kat_megatron.cli", "convert"]
    hf, m = str(work / "hf"), str(work / "m")
    cases = {
        "baseline_transformers": [py, "-c", BASELINE, hf, str(work / "sd.pt")],
        "imports_only": [py, "-c", IMPORTS],
        "hf_to_mcore": [*kat, "hf-to-mcore", "--hf", hf, "--out", m],
        "hf_to_mcore_ranks": [
            *kat,
            "hf-to-mcore",
            "--hf",
            hf,
            "--out",
            m,
            "--ranks",
            "--overwrite",
        ],
        "mcore_to_hf": [*kat, "mcore-to-hf", "--mcore", m, "--out", str(work / "o")],
    }
    res = {}
    for name, cmd in cases.items():
        wall, rss = measure(cmd)
        res[name] = (wall, rss)
        print(json.dumps({"case": name, "seconds": round(wall, 2), "peak_rss_gb": round(rss, 3)}))
    base_t, base_m = res["baseline_transformers"]
    for name in ("hf_to_mcore", "hf_to_mcore_ranks", "mcore_to_hf"):
        t, m = res[name]
        print(f"{name}: time ratio {t / base_t:.2f}, peak RSS ratio {m / base_m:.2f} "
              f"(model {info['bytes'] / 2**30:.2f} GiB, largest tensor "
              f"{info['largest_tensor_bytes'] / 2**30:.2f} GiB)")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
