"""Load test of `kat serve` on loopback: requests/s and latency percentiles by concurrency.

    .venv/bin/python benchmarks/serve_load.py [--clients 1,8,32,128] [--requests 256]
        [--max-tokens 16] [--time-limit 120] [--ckpt DIR] [--nproc 1] [--json OUT.json]

Starts one `kat serve` subprocess on 127.0.0.1 (a free port) for `--ckpt`, or for a tiny
checkpoint it trains first (`examples/tiny_pretrain`, 0 steps: random weights; the cost of a
request depends on the shapes, not the weights). For each concurrency level C, C client threads
each send requests one after another (a closed loop: a client sends its next request when the
last is answered) until `--requests` requests were sent in all or `--time-limit` seconds passed;
every request is a /v1/completions call with its own prompt and seed, `--max-tokens` new tokens
and `ignore_eos` (so every answer has the same length), sampled at temperature 1. Reported per
level: requests answered and failed (any non-200 or connection error), requests/s, latency p50 /
p95 / max, and from the server's `/stats` the mean number of requests per engine batch; the ratio
column is requests/s relative to the 1-client level of the same run (how much batching
concurrent clients gains). Nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def _tiny_checkpoint(root: Path) -> Path:
    run = root / "run"
    cmd = [sys.executable, "-m", "kat_megatron.cli", "train", "examples/tiny_pretrain/config.yaml",
           "parallel.tp=1", "training.steps=0", "checkpoint.save_interval=0",
           "logging.tensorboard=false", f"run.dir={run}"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return run / "checkpoints"


def _start(ckpt: Path, nproc: int, root: Path, clients: int) -> tuple[subprocess.Popen, str]:
    ready = root / "ready.txt"
    cmd = [sys.executable, "-m", "kat_megatron.cli", "serve", "--ckpt", str(ckpt), "--port", "0",
           "--nproc", str(nproc), "--ready-file", str(ready), "--max-batch-size", str(clients),
           "--model-name", "kat"]  # fmt: skip
    log = open(root / "serve.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))  # fmt: skip
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"kat serve did not start; see {root / 'serve.log'}")
        time.sleep(0.3)
    return proc, ready.read_text().strip()


def _level(url: str, clients: int, total: int, max_tokens: int, time_limit: float) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    sent = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + time_limit
    stats = url.removesuffix("/v1") + "/stats"
    before = httpx.get(stats).json()

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if sent[0] >= total or time.monotonic() > stop_at:
                        return
                    i = sent[0]
                    sent[0] += 1
                body = {"model": "kat", "prompt": f"The {i} big horse and the {c} river",
                        "max_tokens": max_tokens, "temperature": 1.0, "seed": i,
                        "ignore_eos": True}  # fmt: skip
                t0 = time.perf_counter()
                try:
                    r = http.post(url + "/completions", json=body)
                    ok = r.status_code == 200
                    why = "" if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as err:
                    ok, why = False, type(err).__name__
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if ok else failures.append(why))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = httpx.get(stats).json()
    batches = max(after["batches"] - before["batches"], 1)
    lat = sorted(latencies) or [float("nan")]
    return {
        "clients": clients,
        "answered": len(latencies),
        "failed": len(failures),
        "failures": sorted(set(failures)),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_s": round(statistics.median(lat), 3),
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
        "max_s": round(lat[-1], 3),
        "requests_per_batch": round((after["requests"] - before["requests"]) / batches, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,8,32,128", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=256, help="requests per level, at most")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per level, at most")
    p.add_argument("--ckpt", default=None, help="checkpoint to serve (default: a tiny one)")
    p.add_argument("--nproc", type=int, default=1, help="kat serve --nproc (tensor parallelism)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else _tiny_checkpoint(root)
        proc, url = _start(ckpt, args.nproc, root, max(levels))
        try:
            _level(url, 1, 2, args.max_tokens, 30)  # warm-up
            rows = [_level(url, c, args.requests, args.max_tokens, args.time_limit) for c in levels]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    base = next((r["requests_per_s"] for r in rows if r["clients"] == 1), rows[0]["requests_per_s"])
    print(f"kat serve, {args.max_tokens} new tokens per request, nproc {args.nproc}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("| clients | answered | failed | requests/s | x 1 client | p50 s | p95 s | max s | "
          "requests per batch |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for r in rows:
        print(f"| {r['clients']} | {r['answered']} | {r['failed']} | {r['requests_per_s']} | "
              f"{r['requests_per_s'] / base:.2f} | {r['p50_s']} | {r['p95_s']} | {r['max_s']} | "
              f"{r['requests_per_batch']} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
