"""`kat serve --ckpt DIR [--nproc N] [--port P] [--host 127.0.0.1] [--max-batch-size B]`."""

from __future__ import annotations

import argparse
import signal
import subprocess
import time

STOP_GRACE_S = 60.0
"""After a forwarded SIGTERM, how long the ranks get to stop before torchrun is terminated."""


def _launch(nproc: int, module_args: list[str]) -> int:
    """Run `kat MODULE_ARGS` on `nproc` local ranks (torchrun); SIGTERM/SIGINT reach the ranks.

    The signal goes to the ranks themselves, not to torchrun (which would kill them at once):
    rank 0 then finishes the batch in progress and every rank exits 0.
    """
    import psutil

    from kat_megatron.launch.local import local_torchrun

    cmd, env = local_torchrun(nproc, module_args)
    proc = subprocess.Popen(cmd, env=env)
    stopping: list[float] = []

    def forward(signum, frame) -> None:
        stopping.append(time.monotonic())
        try:
            ranks = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return
        for rank in ranks:
            try:
                if "kat_megatron.cli" in " ".join(rank.cmdline()):
                    rank.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() - stopping[0] > STOP_GRACE_S:
                proc.terminate()


_LIMIT_FLAGS = [
    ("--limit-max-tokens", int, "max_tokens", None,
     "largest max_tokens a request may ask (default: the context length)"),
    ("--limit-n", int, "max_n", 16, "largest n (samples per prompt; 16)"),
    ("--limit-prompts", int, "max_prompts", 64, "most prompts per completions request (64)"),
    ("--limit-samples", int, "max_samples", 256, "most sequences (prompts x n) per request (256)"),
    ("--max-body-bytes", int, "max_body_bytes", 8 << 20, "largest request body (8 MiB)"),
    ("--backlog", int, "backlog", 1024, "listen backlog: connections queued before accept (1024)"),
    ("--read-timeout", float, "read_timeout_s", 30.0,
     "seconds a connection may take to send a request, or stay idle (30)"),
    ("--max-connections", int, "max_connections", 512,
     "open connections served at once; more get 503 (512)"),
]  # fmt: skip
"""`kat serve` flags of `http_server.ServeLimits`: (flag, type, field, default, help)."""


def _rank_args(args: argparse.Namespace) -> list[str]:
    """The `kat serve ...` arguments each rank runs with (everything but --nproc)."""
    out = ["serve", "--ckpt", args.ckpt, "--host", args.host, "--port", str(args.port),
           "--max-batch-size", str(args.max_batch_size)]  # fmt: skip
    for flag, value in (
        ("--max-sequence-length", args.max_sequence_length),
        ("--model-name", args.model_name),
        ("--tokenizer", args.tokenizer),
        ("--ready-file", args.ready_file),
        ("--reasoning-parser", args.reasoning_parser),
        *((flag, getattr(args, dest)) for flag, _, dest, _, _ in _LIMIT_FLAGS),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def run(args: argparse.Namespace) -> int:
    from kat_megatron.inference.http_server import ServeLimits
    from kat_megatron.inference.server import ServeConfig, serve
    from kat_megatron.launch.local import under_launcher
    from kat_megatron.training.checkpoint_meta import resolve_checkpoint
    from kat_megatron.utils.logging import setup_logging

    cfg = ServeConfig(
        ckpt=args.ckpt,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_sequence_length=args.max_sequence_length,
        model_name=args.model_name,
        tokenizer=args.tokenizer,
        ready_file=args.ready_file,
        reasoning_parser=args.reasoning_parser,
        limits=ServeLimits(**{dest: getattr(args, dest) for _, _, dest, _, _ in _LIMIT_FLAGS}),
    )
    resolve_checkpoint(cfg.ckpt)  # a missing checkpoint fails here, once
    if args.nproc > 1 and not under_launcher():
        return _launch(args.nproc, _rank_args(args))
    setup_logging()

    def ready(url: str) -> None:
        print(f"kat serve: listening on {url}", flush=True)

    return serve(cfg, on_ready=ready)


def register(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description=(
            "Serve kat checkpoint DIR with the rollout engine: /v1/completions (with log-probs), "
            "/v1/chat/completions (AutoThink chat template), /v1/models, /health. With --nproc N "
            "the model runs at tensor parallelism N (rank 0 answers HTTP). Stops cleanly on "
            "SIGTERM or Ctrl-C. See docs/rollout_engine.md."
        ),
    )
    s.add_argument(
        "--ckpt", required=True, help="checkpoint: iter_N/, a checkpoints folder or a run dir"
    )
    s.add_argument("--nproc", type=int, default=1, help="local ranks = tensor parallelism")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    s.add_argument("--port", type=int, default=8000, help="port (0: a free one; default 8000)")
    s.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded at once")
    s.add_argument("--max-sequence-length", type=int, default=None,
                   help="prompt + completion tokens (default: the model's maximum)")  # fmt: skip
    s.add_argument(
        "--model-name",
        default=None,
        help="model id reported and the only one requests may name (others get 404, "
        "as vLLM); 'a,b' serves aliases (default: the checkpoint folder's name)",
    )
    limits = s.add_argument_group("limits (malformed or oversized requests get 4xx JSON errors)")
    for flag, kind, dest, default, what in _LIMIT_FLAGS:
        limits.add_argument(flag, type=kind, dest=dest, default=default, help=what)
    s.add_argument("--tokenizer", default=None, help="tokenizer (default: the run's)")
    s.add_argument("--ready-file", default=None, help="write the base URL here once serving")
    s.add_argument("--reasoning-parser", choices=["none", "autothink"], default="none",
                   help="autothink: chat replies split into content (the answer), "
                   "reasoning_content (the think text) and autothink {judge, mode}, as vLLM's "
                   "--reasoning-parser; none (default): the raw continuation")  # fmt: skip
    s.set_defaults(func=run)
