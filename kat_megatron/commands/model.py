"""`kat model info PRESET|config.yaml`: total and active parameters per component."""

from __future__ import annotations

import argparse


def info(args: argparse.Namespace) -> int:
    from kat_megatron.models.info import model_info

    print(model_info(args.name))
    return 0


def register(sub) -> None:
    m = sub.add_parser("model", help="model utilities")
    msub = m.add_subparsers(dest="model_command", required=True)
    p = msub.add_parser("info", help="total and active parameters per component")
    p.add_argument(
        "name", help="preset (kat-v1-40b, kat-200b-a40b, tiny-dense, tiny-moe) or a config.yaml"
    )
    p.set_defaults(func=info)
