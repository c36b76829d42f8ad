"""The `kat` command: `kat train CONFIG.yaml [key=value ...] [--nproc N]`, `kat model info NAME`.

Subcommands live in `kat_megatron/commands/` (one module each); `kat <command> --help` explains
each one. User errors (ValueError, FileNotFoundError) print one line and exit 2. Megatron-Core's
import-time notes about missing Transformer Engine / Apex are collected before any command runs
and logged once as one line (`kat_megatron/utils/logging.py`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kat_megatron.commands import COMMANDS
from kat_megatron.utils.logging import capture_backend_notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kat", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"kat_megatron.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    capture_backend_notes()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`kat train cfg.yaml --nproc 2 optimizer.lr=1e-3`).
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kat: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
