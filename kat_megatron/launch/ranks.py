"""N ranks on this machine, rendezvous on loopback only:
`python -m kat_megatron.launch.ranks --nproc-per-node N [--bind ADDR] SCRIPT|-m MODULE ARGS...`

What every local `kat ... --nproc N` (and the multi-rank tests) runs, through
`launch.local.torchrun_command`. It does what `torchrun --standalone` does on one machine, minus
the exposure: torchrun's agent hosts its c10d stores on every interface (`*:port`, no
authentication), so anyone on the network could join or disturb the job. Here:

- the launcher hosts the one TCPStore the ranks rendezvous through, on a socket it binds itself
  (`master_listen_fd`) to ADDR (default 127.0.0.1; env KAT_RDZV_BIND), port chosen by the OS;
  ranks are its clients (`TORCHELASTIC_USE_AGENT_STORE=True`, as under torchrun's agent);
- with a loopback ADDR, gloo's and NCCL's own sockets use the loopback interface too
  (`GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` = lo, unless already set), so the job listens on
  nothing but 127.0.0.1 (tests/launch/test_ranks.py checks with `ss`);
- each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK=0, ROLE_RANK,
  MASTER_ADDR and MASTER_PORT, as torchrun sets them.

Supervision, as torchrun: when a rank exits non-zero the others get SIGTERM and, `--grace-s`
(default 30) later, SIGKILL; SIGTERM/SIGINT sent to the launcher are forwarded to every rank,
with the same grace. Exit code: the first failing rank's (killed by signal n: 128 + n), else 0.
Multi-node jobs do not come here: `kat submit` runs torchrun on every node (launch/torchrun.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import socket
import subprocess
import sys
import time

LOOPBACK = ("127.0.0.1", "localhost", "::1")
POLL_S = 0.1


_OWN = ("--nproc-per-node", "--bind", "--grace-s")


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's own options, the target): the target starts at the first argument that
    is not one of `_OWN` (with its value) or -h/--help, so `-m MODULE` is passed through."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help") or any(a.startswith(o + "=") for o in _OWN):
            i += 1
        elif a in _OWN:
            i += 2
        else:
            break
    return argv[:i], argv[i:]


def _parse(argv: list[str]) -> argparse.Namespace:
    own, target = _split(argv)
    p = argparse.ArgumentParser(
        prog="python -m kat_megatron.launch.ranks",
        description="Start N local ranks whose rendezvous listens on loopback only.",
    )
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks to start")
    p.add_argument("--bind", default=os.environ.get("KAT_RDZV_BIND", "127.0.0.1"),
                   help="address of the rendezvous store (127.0.0.1; env KAT_RDZV_BIND)")  # fmt: skip
    p.add_argument("--grace-s", type=float, default=30.0,
                   help="seconds between SIGTERM and SIGKILL when stopping ranks (30)")  # fmt: skip
    p.add_argument("target", nargs="*", help="SCRIPT ARGS... or -m MODULE ARGS...")
    args = p.parse_args(own)
    args.target = target[1:] if target[:1] == ["--"] else target
    if args.nproc_per_node < 1:
        p.error(f"--nproc-per-node {args.nproc_per_node}: expected >= 1")
    if not args.target:
        p.error("nothing to run: give a script or -m MODULE")
    return args


def rank_env(base: dict[str, str], rank: int, world: int, addr: str, port: int) -> dict[str, str]:
    """The environment rank `rank` of `world` starts with."""
    env = dict(base)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(world),
        MASTER_ADDR=addr, MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
    )  # fmt: skip
    if addr in LOOPBACK:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return env


def _store(addr: str):
    """(TCPStore server, its port, its socket) listening on `addr` only."""
    import torch.distributed as dist

    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((addr, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        addr, port, None, True, datetime.timedelta(minutes=30), False,
        master_listen_fd=sock.fileno(), use_libuv=True,
    )  # fmt: skip
    return store, port, sock


def _stop(procs: list[subprocess.Popen], grace_s: float, sig: int = signal.SIGTERM) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(args: argparse.Namespace) -> int:
    """Start the ranks and supervise them (see the module docstring); the exit code."""
    addr = "127.0.0.1" if args.bind == "localhost" else args.bind
    store, port, _sock = _store(addr)
    target = args.target
    world = args.nproc_per_node
    procs = [
        subprocess.Popen([sys.executable, *target], env=rank_env(os.environ, r, world, addr, port))
        for r in range(world)
    ]
    stopping: list[int] = []
    first: list[int] = []  # the exit code of the first rank seen failing

    def forward(signum, frame) -> None:
        stopping.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    since = None
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed and not first:
            first.append(_code(failed[0][1]))
        if failed and any(c is None for c in codes) and not stopping:
            rank, code = failed[0]
            print(f"[kat ranks] rank {rank} exited with code {_code(code)}; stopping the "
                  f"other ranks", file=sys.stderr, flush=True)  # fmt: skip
            stopping.append(0)  # stopping them: no second notice
            _stop(procs, args.grace_s)
            codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            del store
            return first[0] if first else 0
        if stopping:
            since = since or time.monotonic()
            if time.monotonic() - since > args.grace_s:
                _stop(procs, 0.0, signal.SIGKILL)
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    return run(_parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
