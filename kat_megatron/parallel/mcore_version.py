"""The one Megatron-Core version kat is written against: `python -c "from
kat_megatron.parallel.mcore_version import SUPPORTED_MCORE; print(SUPPORTED_MCORE)"`.

`setup.py` pins it (`megatron-core==SUPPORTED_MCORE`, read from this file), the CPU adaptation
layer (`cpu_adapter.py`) refuses any other version, and every fix in `mcore_compat.py` is
skipped with a loud warning on another version (its target code may have moved or been fixed).
No torch or Megatron-Core import here.
"""

from __future__ import annotations

import logging

SUPPORTED_MCORE = "0.16.1"

log = logging.getLogger("kat")


def installed_mcore() -> str:
    """The installed megatron-core's version string."""
    from megatron.core import package_info

    return package_info.__version__


def warn_unsupported(what: str, version: str) -> None:
    """The loud warning of a version-gated patch that is skipped on `version`."""
    log.warning(
        "%s: written for megatron-core==%s, found %s: NOT applied. kat is tested on %s only; "
        "pin megatron-core==%s (setup.py does) or check that the upstream bug is fixed",
        what, SUPPORTED_MCORE, version, SUPPORTED_MCORE, SUPPORTED_MCORE,
    )  # fmt: skip
