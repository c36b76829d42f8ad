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
