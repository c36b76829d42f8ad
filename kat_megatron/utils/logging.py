"""Rank-aware logging for kat: INFO on global rank 0, WARNING and above on every rank."""

from __future__ import annotations

import logging
import os
import sys
import warnings


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = int(os.environ.get("RANK", "0"))
        return rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: str = "INFO") -> None:
    """Configure the `kat_megatron`/`kat` loggers once; silence Megatron's import-time warnings."""
    fmt = "[%(asctime)s %(levelname)s rank" + os.environ.get("RANK", "0") + "] %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter())
    for name in ("kat", "kat_megatron"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # Megatron-Core warns at import about missing Apex/TE; on CPU that is the expected state.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.getLogger("megatron").setLevel(logging.WARNING)
