"""Fixes for Megatron-Core 0.16.1 paths that kat uses and upstream leaves broken.

Applied by `kat_megatron.parallel.init.initialize()` on every machine (CPU and GPU), each fix
gated on the pinned version and on the condition that triggers the bug; tested in
`tests/parallel/test_mcore_compat.py` and by the resume tests.

- `torch_adam_step_on_load`: without Apex or Transformer Engine the distributed optimizer runs
  torch's Adam, whose per-parameter state holds a `step` tensor. `load_state_dict` sets it, then
  `_set_main_param_and_optimizer_states` copies every state key from the checkpoint tensors,
  which have no `step` (it is restored from the param groups), and fails with KeyError('step').
  The fix leaves `step` out of that copy. `load_state_dict` also gives every parameter the *same*
  `step` tensor, which torch's Adam then increments in place once per parameter per step (wrong
  bias correction after a resume); the fix gives each parameter its own copy.
"""

from __future__ import annotations

import functools

from kat_megatron.parallel.mcore_version import SUPPORTED_MCORE, installed_mcore, warn_unsupported

_APPLIED: list[str] = []
_WARNED: list[str] = []


def _fix_torch_adam_step_on_load() -> bool:
    from megatron.core.optimizer import distrib_optimizer as mod

    if getattr(mod, "HAVE_APEX_OR_TE", True):
        return False  # FusedAdam keeps no `step` in its state: the bug does not arise
    cls = mod.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_kat_fix", False):
        return True

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    load = cls.load_state_dict

    @functools.wraps(load)
    def load_state_dict(self, state_dict):
        load(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()

    set_states._kat_fix = True
    cls._set_main_param_and_optimizer_states = set_states
    cls.load_state_dict = load_state_dict
    return True


FIXES = {"torch_adam_step_on_load": _fix_torch_adam_step_on_load}


def apply() -> list[str]:
    """Apply the fixes whose trigger is present (idempotent); returns the names applied. On
    another Megatron-Core version none is applied and each says so, loudly, once."""
    if _APPLIED:
        return list(_APPLIED)
    version = installed_mcore()
    if version != SUPPORTED_MCORE:
        for name in FIXES:
            if name not in _WARNED:
                warn_unsupported(f"kat's Megatron-Core fix {name!r}", version)
                _WARNED.append(name)
        return []
    for name, fix in FIXES.items():
        if fix():
            _APPLIED.append(name)
    return list(_APPLIED)
