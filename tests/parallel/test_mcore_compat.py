"""Megatron-Core 0.16.1 fixes (kat_megatron/parallel/mcore_compat.py).

The end-to-end proof is tests/training/test_resume.py (bitwise resume of the distributed
optimizer with torch Adam); these tests pin down when each fix applies.
"""

from __future__ import annotations

from megatron.core.optimizer import distrib_optimizer

from kat_megatron.parallel import mcore_compat


def test_fix_applies_exactly_when_torch_adam_is_used():
    applied = mcore_compat.apply()
    expected = [] if distrib_optimizer.HAVE_APEX_OR_TE else ["torch_adam_step_on_load"]
    assert applied == expected
    assert mcore_compat.apply() == expected  # idempotent
    cls = distrib_optimizer.DistributedOptimizer
    patched = getattr(cls._set_main_param_and_optimizer_states, "_kat_fix", False)
    assert patched == (not distrib_optimizer.HAVE_APEX_OR_TE)


def test_another_version_applies_nothing_and_warns_once_per_fix(monkeypatch, caplog):
    monkeypatch.setattr(mcore_compat, "_APPLIED", [])
    monkeypatch.setattr(mcore_compat, "_WARNED", [])
    monkeypatch.setattr(mcore_compat, "installed_mcore", lambda: "0.99.0")
    with caplog.at_level("WARNING", logger="kat"):
        assert mcore_compat.apply() == []
        assert mcore_compat.apply() == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(mcore_compat.FIXES)  # once per fix, not per call
    assert "'torch_adam_step_on_load'" in lines[0] and "NOT applied" in lines[0]
    assert "megatron-core==0.16.1, found 0.99.0" in lines[0]


def test_one_supported_version_everywhere():
    import re
    from pathlib import Path

    from kat_megatron.parallel import cpu_adapter, mcore_version

    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert 'f"megatron-core=={SUPPORTED_MCORE}"' in setup  # setup.py reads mcore_version.py
    assert mcore_version.SUPPORTED_MCORE == "0.16.1" == mcore_version.installed_mcore()
    assert cpu_adapter.SUPPORTED_MCORE is mcore_compat.SUPPORTED_MCORE
    for module in (cpu_adapter, mcore_compat):  # no second literal of the version
        assert not re.search(r'SUPPORTED_MCORE\s*=\s*"', Path(module.__file__).read_text())
