"""Rank-aware logging for kat: INFO on global rank 0, WARNING and above on every rank.

Megatron-Core warns at import time, once per module and rank, that Transformer Engine / Apex are
missing (six notes, twelve lines, per rank on a CPU machine). `capture_backend_notes()` (called
first thing by `kat`) collects them instead of printing; `setup_logging()` then reports them as
one INFO line on rank 0, and any note that arrives later is counted without another line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

log = logging.getLogger("kat")

_BACKEND_NOTE = re.compile(r"(Transformer Engine|Apex)\b.*\bnot installed")
_notes: list[str] = []
_state = {"captured": False, "reported": False, "logging": False}
_show_original = warnings.showwarning


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = int(os.environ.get("RANK", "0"))
        return rank == 0 or record.levelno >= logging.WARNING


def _report_notes() -> None:
    if _state["reported"] or not _notes or not _state["logging"]:
        return
    _state["reported"] = True
    log.info(
        "Megatron-Core: Transformer Engine / Apex not installed, its torch fallbacks are in use "
        "(%d import-time notes, e.g. %r)",
        len(_notes),
        _notes[0],
    )


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    if _BACKEND_NOTE.search(str(message)):
        _notes.append(str(message))
        _report_notes()
        return
    _show_original(message, category, filename, lineno, file, line)


def capture_backend_notes() -> None:
    """Collect Megatron-Core's missing-TE/Apex notes instead of printing them (idempotent)."""
    if not _state["captured"]:
        _state["captured"] = True
        warnings.showwarning = _show


def backend_notes() -> list[str]:
    """The missing-TE/Apex notes collected in this process so far."""
    return list(_notes)


def setup_logging(level: str = "INFO") -> None:
    """Configure the `kat_megatron`/`kat` loggers once; report Megatron's backend notes as one
    line; quiet torch.distributed's FutureWarnings."""
    fmt = "[%(asctime)s %(levelname)s rank" + os.environ.get("RANK", "0") + "] %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter())
    for name in ("kat", "kat_megatron"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    capture_backend_notes()
    _state["logging"] = True
    _report_notes()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.getLogger("megatron").setLevel(logging.WARNING)
