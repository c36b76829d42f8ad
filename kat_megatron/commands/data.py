"""`kat data {tag,synthesize,coldstart} CONFIG.yaml [key=value ...]`: AutoThink data pipelines.

tag labels queries think-on/think-off from forced-mode pass rates; synthesize writes think-on
(solver/thinker/critic) and think-off (rejection-sampled) responses; coldstart writes judge texts
and renders SFT examples. Each writes OUTPUT/{dataset/,data.jsonl,rejected.jsonl,summary.json}
and resumes an interrupted run from OUTPUT/.work. See docs/autothink_data.md.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = {
    "tag": "label queries think-on/think-off by forced-mode pass rates",
    "synthesize": "write think-on (multi-agent) and think-off (rejection-sampled) responses",
    "coldstart": "write judge texts and build AutoThink SFT examples",
}


def run(args: argparse.Namespace) -> int:
    from kat_megatron.data import pipelines
    from kat_megatron.utils.logging import setup_logging

    setup_logging()
    cfg = pipelines.load(args.data_command, args.config, args.overrides)
    summary = pipelines.PIPELINES[args.data_command][1](cfg)
    shown = {k: summary[k] for k in ("counts", "mode_ratio", "requests")}
    print(json.dumps(shown, indent=2))
    failed = summary["counts"]["failed"]
    if failed:
        print(
            f"kat: {failed} record(s) failed (see {cfg.output}/summary.json); rerun the same "
            "command to retry them (answered requests are not sent again)",
            file=sys.stderr,
        )
        return 1
    return 0


def register(sub) -> None:
    d = sub.add_parser("data", help="AutoThink data pipelines (tag, synthesize, coldstart)")
    dsub = d.add_subparsers(dest="data_command", required=True)
    for name, text in HELP.items():
        p = dsub.add_parser(name, help=text, description=f"kat data {name}: {text}.")
        p.add_argument("config", help="YAML config (see docs/autothink_data.md)")
        p.add_argument("overrides", nargs="*", help="dotted overrides key=value")
        p.set_defaults(func=run)
