"""Stage rl's typed parts and checks: `python -c "from kat_megatron.config import load_config;
from kat_megatron.rl.parts import build_parts; print(build_parts(load_config(
'examples/tiny_rl/config.yaml').rl))"`.

The run config keeps `rl.sampling`, `rl.rewards`, `rl.advantages`, `rl.policy_loss` and
`rl.rollout` as plain mappings (the config layer imports no component); `build_parts` turns
each into its component's dataclass, which validates it, and names a bad key
`rl.<section>.<field>`. `check_rl` adds the
cross-section rules of `stage: rl`; the stage registry (`kat_megatron/stages.py`) runs it before
any rank starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from kat_megatron.config.schema import KatConfig, RLConfig
from kat_megatron.inference.types import SamplingParams
from kat_megatron.losses.policy import PolicyLossConfig
from kat_megatron.models.packed_seq import packing_enabled
from kat_megatron.rl.advantages import AdvantageConfig
from kat_megatron.rl.rewards import RewardConfig
from kat_megatron.rl.rollout_config import RolloutConfig, check_vllm, resolve_vllm_python


@dataclass(frozen=True)
class RLParts:
    """The dataclasses of the five `rl.*` mappings."""

    sampling: SamplingParams
    rewards: RewardConfig
    advantages: AdvantageConfig
    policy_loss: PolicyLossConfig
    rollout: RolloutConfig


_CLASSES: dict[str, type] = typing.get_type_hints(RLParts)
"""`rl.<name>` -> its dataclass, as `RLParts` declares them."""


def build_section(rl: RLConfig, name: str, **defaults: Any) -> Any:
    """The dataclass of `rl.<name>` from its mapping (over `defaults`); errors name the key as
    `rl.<name>.<field>`."""
    cls = _CLASSES[name]
    values = getattr(rl, name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"rl.{name}: unknown keys {unknown}; known: {known}")
    try:
        return cls(**{**defaults, **values})
    except (TypeError, ValueError) as err:
        msg = str(err)
        for prefix in (f"{name}.", "policy_loss.", "advantages.", "rewards."):
            if msg.startswith(prefix):  # "rewards.x=1: ..." -> "rl.rewards.x=1: ..."
                raise ValueError(f"rl.{name}.{msg[len(prefix) :]}") from None
        raise ValueError(f"rl.{name}: {msg}") from None


def build_parts(rl: RLConfig) -> RLParts:
    """All five parts; `rewards.max_new_tokens` follows the sampling budget."""
    sampling = build_section(rl, "sampling")
    return RLParts(
        sampling=sampling,
        rewards=build_section(rl, "rewards", max_new_tokens=sampling.max_new_tokens),
        advantages=build_section(rl, "advantages"),
        policy_loss=build_section(rl, "policy_loss"),
        rollout=build_section(rl, "rollout"),
    )


def check_rl(cfg: KatConfig) -> None:
    """Cross-section checks of `stage: rl` (one-line ValueErrors), after the parts validate."""
    rl, par = cfg.rl, cfg.parallel
    parts = build_parts(rl)
    if par.vpp is not None:
        raise ValueError("stage rl: parallel.vpp (interleaved pipeline stages) is not supported")
    if par.pp != 1 and parts.rollout.engine != "vllm":
        raise ValueError(
            f"stage rl: parallel.pp={par.pp} needs rl.rollout.engine=vllm (the colocated "
            "megatron engine runs at parallel.pp=1)"
        )
    if par.cp != 1:
        raise ValueError("stage rl: parallel.cp must be 1")
    if cfg.model.mtp_num_layers:
        raise ValueError(
            "stage rl trains the main head only: set model.mtp_num_layers=0 (MTP heads would "
            "add an LM loss on sampled text)"
        )
    if rl.prompts is None:
        raise ValueError("stage rl: set rl.prompts to a JSONL file or a datasets directory")
    if rl.max_sequence_length > cfg.model.max_position_embeddings:
        raise ValueError(
            f"rl.max_sequence_length={rl.max_sequence_length} exceeds "
            f"model.max_position_embeddings={cfg.model.max_position_embeddings}"
        )
    packing_enabled(rl.packing, cfg.model, "rl.packing")
    if rl.router_replay:
        _check_router_replay(cfg, parts)
    new = parts.sampling.max_new_tokens
    if new >= rl.max_sequence_length:
        raise ValueError(
            f"rl.sampling.max_new_tokens={new} leaves no room for the prompt "
            f"in rl.max_sequence_length={rl.max_sequence_length}"
        )
    if parts.rollout.engine == "vllm":
        _check_vllm_rollout(cfg, parts)


def _check_router_replay(cfg: KatConfig, parts: RLParts) -> None:
    """`rl.router_replay`: a MoE policy, the engine that reports its routing, one TP rank."""
    if not cfg.model.is_moe:
        raise ValueError("rl.router_replay: the policy has no MoE layers (model.num_moe_experts)")
    if parts.rollout.engine != "megatron":
        raise ValueError(
            "rl.router_replay needs rl.rollout.engine=megatron (vLLM does not report the "
            "experts it routed to)"
        )
    if cfg.parallel.tp != 1:
        raise ValueError(
            "rl.router_replay needs parallel.tp=1 (sequence parallelism splits the router's "
            "tokens); use parallel.ep for the experts"
        )


def _check_vllm_rollout(cfg: KatConfig, parts: RLParts) -> None:
    """`rl.rollout.engine: vllm`: what its refit and worker support, and vLLM installed."""
    if parts.sampling.stop_strings:
        raise ValueError(
            "rl.rollout.engine=vllm: rl.sampling.stop_strings are not supported (the worker "
            "has no tokenizer); use stop token ids or rl.rollout.engine=megatron"
        )
    check_vllm(resolve_vllm_python(parts.rollout.vllm_python))
