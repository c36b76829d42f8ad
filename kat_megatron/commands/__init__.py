"""`kat` subcommands: one module per command, each with `register(subparsers)`.

A command module adds its parser(s) and sets `func` (a callable taking the parsed args and
returning an exit code). Add new modules to `COMMANDS`; keep them thin (parse, build, run).
"""

COMMANDS = [
    "train",
    "model",
    "data",
    "submit",
    "jobs",
    "plan",
    "convert",
    "kd",
    "serve",
    "eval",
    "demo",
]
