"""The Step-SRPO / GRPO trainer: `kat train examples/tiny_rl/config.yaml` (`stage: rl`).

NeMo-Aligner's RL loop on Megatron-Core, colocated: each step (one `training.steps` unit)
1. draws `rl.prompts_per_step` prompts (deterministic sampler, position saved in checkpoints)
   and samples `rl.group_size` rollouts each with the `RolloutEngine`, which reads the live
   policy weights (`kat_megatron/rl/rollouts.py`: scores, forced-mode probes, reference
   log-probs, advantages per group, dynamic sampling);
2. trains on them with `get_forward_backward_func` (`rl/logprobs.py`: log-probs and entropy
   from vocab-sharded logits, `losses/policy.py`), gradients normalised over the (mini-)batch:
   one optimizer step by default, or `rl.ppo_epochs` passes of `rl.mini_batches` steps each,
   against the old log-probs of the policy before the first of them;
3. advances the LR schedule once and refits the engine (a no-op for the colocated engine; with
   `rl.rollout.engine: vllm` the weights go to the vLLM worker in shared-memory buckets,
   `rl/vllm_engine.py`).
The rollout engine is `rl.rollout.engine`: `megatron` (the colocated `RolloutEngine`, default)
or `vllm`; with either, `rollout/logprob_diff_mean|max` compare its log-probs with the trainer's.
Model build, DDP + distributed optimizer, scheduler, checkpoints, resume, signals and metrics
sinks are `training/loop.py`'s `Trainer`; this subclass adds the RL state (the prompt sampler's
position) to checkpoints and writes `<run.dir>/rollouts.jsonl` (drawn prompt ids and a few
rollout texts per step). Every key of metrics.jsonl is described in docs/rl_trainer.md.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from kat_megatron.config import KatConfig
from kat_megatron.data.tokenizer import load_tokenizer
from kat_megatron.inference.engine import RolloutEngine
from kat_megatron.models.packed_seq import packing_enabled
from kat_megatron.rl import router_replay
from kat_megatron.rl.batching import (
    RolloutSample,
    microbatches,
    num_microbatches,
    pad_multiple_for,
    response_values,
)
from kat_megatron.rl.logprobs import DIFF_MAX, forward_logprobs, rl_forward_step
from kat_megatron.rl.parts import build_parts
from kat_megatron.rl.prompts import PromptSampler, load_prompts
from kat_megatron.rl.rollouts import Group, RolloutCollector
from kat_megatron.rl.step_metrics import (
    report_reward_errors,
    reward_error_metrics,
    reward_errors,
    rollout_metrics,
)
from kat_megatron.training.checkpoint_meta import resolve_checkpoint
from kat_megatron.training.checkpointing import load_frozen_model
from kat_megatron.training.loop import Trainer, forward_backward, reduce_metrics
from kat_megatron.utils.io import atomic_write_text

log = logging.getLogger("kat")


def _max_over_dp(value: int) -> int:
    t = torch.tensor([value], dtype=torch.long)
    if parallel_state.get_data_parallel_world_size() > 1:
        t = t.cuda() if torch.cuda.is_available() else t
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    return int(t.item())


def _sum_over_dp(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        t = t.cuda() if torch.cuda.is_available() else t
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return float(t.item())


def _pop_max(losses: list[dict], key: str) -> float | None:
    """Max over micro-batches and all ranks of the `[max, 1]` metric `key`, removed from
    `losses` (so `reduce_metrics` does not average it); None where no rank has it. Collective:
    every rank calls it."""
    local = max((float(item.pop(key)[0]) for item in losses if key in item), default=-1.0)
    t = torch.tensor([local], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.cuda() if torch.cuda.is_available() else t
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    value = float(t.item())
    return value if value >= 0 else None


def _pipeline_overrides(cfg: KatConfig) -> dict:
    """TransformerConfig fields of stage rl's models at PP > 1: Megatron-Core's pipeline
    schedules then send each micro-batch's activation shape before the activation (the rows of
    a micro-batch are padded to its own longest rollout, not to one length). Megatron-Core
    refuses that next to its default (allgather) token dispatcher even in a dense model, which
    has no dispatcher: a dense model names alltoall; a MoE model keeps
    model.moe_token_dispatcher_type."""
    if cfg.parallel.pp == 1:
        return {}
    dense = {} if cfg.model.is_moe else {"moe_token_dispatcher_type": "alltoall"}
    return {"variable_seq_lengths": True, **dense}


def _prompt_records(cfg: KatConfig, run_dir: Path) -> tuple[list]:
    """The RL prompt records (`rl.prompts`), validated: the trainer's one "dataset"."""
    return (load_prompts(cfg.rl.prompts),)


class RLTrainer(Trainer):
    """`RLTrainer(cfg).run()`: Step-SRPO / GRPO on the shared loop (see the module doc)."""

    @staticmethod
    def model_overrides(cfg: KatConfig) -> dict:
        """`rl.router_replay`: the policy registers a RouterReplay per MoE layer; at PP > 1 the
        stages exchange each micro-batch's shape (rollout rows differ in length)."""
        out = router_replay.transformer_overrides() if cfg.rl.router_replay else {}
        return {**out, **_pipeline_overrides(cfg)}

    def __init__(self, cfg: KatConfig) -> None:
        super().__init__(cfg, build_datasets=_prompt_records)
        rl = cfg.rl
        self.parts = build_parts(rl)
        self.loss_cfg = self.parts.policy_loss
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.pad_multiple = pad_multiple_for(cfg.parallel.tp)
        self.packing = packing_enabled(rl.packing, cfg.model, "rl.packing")
        self.engine = self._build_engine()
        if rl.router_replay:
            log.info(
                "router replay: the engine records and training replays the experts of %d MoE "
                "layers",
                router_replay.num_layers(),
            )
        self.ref_model = self._build_reference() if self.loss_cfg.needs_ref else None
        prompts = self.datasets[0]
        self.sampler = PromptSampler(len(prompts), cfg.training.seed, rl.shuffle)
        self.collector = RolloutCollector(
            self.engine,
            self.tokenizer,
            prompts,
            self.sampler,
            self.parts,
            rl,
            cfg.training.seed,
            self._reference_logprobs if self.ref_model is not None else None,
        )
        self._check_prompt_lengths(prompts)
        self.rollout_log = self.run_dir / "rollouts.jsonl"
        self._log_truncated = False
        adv = self.parts.advantages
        self.mode_weight = adv.mode_weight if adv.estimator == "step_srpo" else 0.0

    # ----------------------------------------------------------------------------- set-up
    def _build_engine(self):
        """`rl.rollout.engine`: the colocated `RolloutEngine` (megatron) or a vLLM worker
        holding a copy of the policy, refitted after every optimizer step (vllm)."""
        cfg, rl = self.cfg, self.cfg.rl
        dtype = self.model[0].config.params_dtype
        if self.parts.rollout.engine == "vllm":
            from kat_megatron.rl.vllm_engine import VllmRolloutEngine

            return VllmRolloutEngine(
                self.model,
                self.tokenizer,
                cfg.model,
                self.parts.rollout,
                max_sequence_length=rl.max_sequence_length,
                params_dtype=dtype,
                seed=cfg.training.seed,
                log_dir=self.run_dir,
            )
        return RolloutEngine(
            self.model,
            self.tokenizer,
            max_sequence_length=rl.max_sequence_length,
            max_batch_size=rl.engine_max_batch_size,
            params_dtype=dtype,
            seed=cfg.training.seed,
            routing_recorder=router_replay.EngineRecorder() if rl.router_replay else None,
        )

    def run(self) -> list[dict[str, Any]]:
        try:
            return super().run()
        finally:
            close = getattr(self.engine, "close", None)
            if close is not None:  # the vLLM worker process
                close()

    def _build_reference(self) -> list:
        """The frozen reference policy (same layout, no DDP): `rl.reference_ckpt`, else the
        initial policy `checkpoint.load`."""
        cfg = self.cfg
        path = cfg.rl.reference_ckpt or cfg.checkpoint.load
        if path is None:
            raise ValueError(
                "rl.policy_loss.kl_coef > 0 needs a reference policy: set rl.reference_ckpt "
                "(or checkpoint.load, the initial policy)"
            )
        path = resolve_checkpoint(path)  # a run directory or checkpoints/ folder: its newest
        ref = load_frozen_model(
            path, cfg.model, cfg.parallel, cfg.training.precision, **_pipeline_overrides(cfg)
        )
        log.info("reference policy for the KL terms: %s", path)
        return ref

    def _check_prompt_lengths(self, prompts) -> None:
        rl = self.cfg.rl
        budget = rl.max_sequence_length - self.parts.sampling.max_new_tokens
        long = [p.id for i, p in enumerate(prompts) if len(self.collector.prompt_ids(i)) > budget]
        if long:
            raise ValueError(
                f"rl.prompts: {len(long)} prompt(s) (e.g. id {long[0]!r}) exceed "
                f"rl.max_sequence_length - rl.sampling.max_new_tokens = {budget} tokens; raise "
                "rl.max_sequence_length or filter the prompts"
            )

    # ----------------------------------------------------------------------------- RL state
    def extra_state(self) -> dict[str, Any]:
        return {"rl": {"prompt_position": self.sampler.position, "num_prompts": self.sampler.n}}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        state = extra.get("rl")
        if state is None:
            log.warning("checkpoint has no RL state: prompts start from the beginning")
            return
        if state["num_prompts"] != self.sampler.n:
            log.warning(
                "rl.prompts changed size (%d -> %d): the prompt order differs from the "
                "interrupted run",
                state["num_prompts"],
                self.sampler.n,
            )
        self.sampler.position = int(state["prompt_position"])

    # ----------------------------------------------------------------------------- one step
    def _response_logprobs(self, model: list, samples: list[RolloutSample]) -> list:
        """`model`'s log p of every response token of `samples`, no grad (collective over DP:
        every rank runs the same number of micro-batches)."""
        mbs = self.cfg.rl.micro_batch_size
        n_micro = _max_over_dp(num_microbatches(len(samples), mbs))
        batches = microbatches(
            samples, mbs, n_micro, self.pad_id, self.pad_multiple, packed=self.packing
        )
        values: list = []
        for k, logp_bs in enumerate(forward_logprobs(model, batches)):
            chunk = samples[k * mbs : (k + 1) * mbs]
            values += response_values(logp_bs, chunk + [None] * (mbs - len(chunk)))
        return values[: len(samples)]

    def _reference_logprobs(self, groups: list[Group]) -> None:
        """Fill `group.ref_logprobs` with the reference policy's log-probs (collective)."""
        samples = [
            RolloutSample(
                g.prompt_ids, list(c.token_ids), [0.0] * len(c.token_ids), [0.0] * len(c.token_ids)
            )
            for g in groups
            for c in g.completions
        ]
        values = self._response_logprobs(self.ref_model, samples)
        i = 0
        for g in groups:
            g.ref_logprobs = values[i : i + len(g.completions)]
            i += len(g.completions)

    def _update(self, samples: list[RolloutSample], with_old: bool) -> tuple[list, float, bool]:
        """Forward-backward over `samples` (this rank's part of a mini-batch) and one optimizer
        step."""
        mbs = self.cfg.rl.micro_batch_size
        n_micro = _max_over_dp(num_microbatches(len(samples), mbs))
        with_ref = self.ref_model is not None
        batches = microbatches(
            samples, mbs, n_micro, self.pad_id, self.pad_multiple, with_ref, with_old, self.packing
        )
        losses, ok, grad_norm = forward_backward(
            self.model,
            self.optimizer,
            partial(rl_forward_step, cfg=self.loss_cfg),
            iter(batches),
            n_micro,
            max(b["tokens"].shape[1] for b in batches),
            batches[0]["tokens"].shape[0],  # 1 for packed (THD) rows
        )
        return losses, grad_norm, ok

    def _train(self, samples: list[RolloutSample]) -> tuple[list, float, bool, int]:
        """`rl.ppo_epochs` passes over this rank's rollouts, each in `rl.mini_batches`
        optimizer steps; the LR schedule advances once. Returns (losses of every update, mean
        grad norm, whether any update was applied, updates applied)."""
        rl = self.cfg.rl
        several = rl.ppo_epochs * rl.mini_batches > 1
        if several:  # the policy before the first update: the PPO ratio's denominator
            for sample, old in zip(samples, self._response_logprobs(self.model, samples)):
                sample.old_logprobs = old
        k, extra = divmod(len(samples), rl.mini_batches)  # contiguous, sizes differ by <= 1
        bounds = [i * k + min(i, extra) for i in range(rl.mini_batches + 1)]
        parts = [samples[a:b] for a, b in zip(bounds, bounds[1:])]
        parts = [p for p in parts if _sum_over_dp(len(p)) > 0]  # same decision on every rank
        losses, norms, applied = [], [], 0
        for _ in range(rl.ppo_epochs):
            for part in parts:
                out, grad_norm, ok = self._update(part, with_old=several)
                losses += out
                if ok:
                    applied += 1
                    if grad_norm is not None:
                        norms.append(grad_norm)
        if applied:
            self.scheduler.step(increment=1)
        mean_norm = sum(norms) / len(norms) if norms else None
        return losses, mean_norm, applied > 0, applied

    def train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        got = self.collector.collect()
        errors = reward_error_metrics(got.rows, got.probe_errors, got.probes)
        report_reward_errors(  # same values on every rank: all of them stop together
            self.state.step + 1,
            reward_errors(got.rows, got.probe_errors),
            errors,
            self.cfg.rl.max_reward_error_rate,
            warn=self.rank == 0,
        )
        samples = self.collector.samples(got.groups)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step is taken with
        train_start = time.perf_counter()
        if got.groups_trained > 0:
            losses, grad_norm, ok, updates = self._train(samples)
            refit_start = time.perf_counter()
            self.engine.refit()
            refit_s = time.perf_counter() - refit_start
        else:  # no group with signal (dynamic sampling) or every group had a reward error
            losses, grad_norm, ok, updates, refit_s = [], None, False, 0, 0.0
            log.warning(
                "step %d: no group to train on (no learning signal, or reward errors); "
                "skipping the update",
                self.state.step + 1,
            )
        train_s = time.perf_counter() - train_start
        diff_max = _pop_max(losses, DIFF_MAX)
        reduced = reduce_metrics(losses)
        train_tokens = _sum_over_dp(sum(s.num_positions for s in samples))
        self.state.step += 1
        self.state.consumed_samples = self.sampler.position
        elapsed = time.perf_counter() - start
        row = {
            "step": self.state.step,
            "loss": reduced.pop("loss", 0.0),
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": not ok,
            "updates": updates,
            "step_time_s": elapsed,
            "tokens_per_s": train_tokens / max(train_s, 1e-9),
            "train_tokens_per_s": train_tokens / max(train_s, 1e-9),
            "rollout_tokens_per_s": got.generated_tokens / max(got.generation_s, 1e-9),
            "rollout_time_s": got.generation_s,
            "train_time_s": train_s,
            "prompt_position": self.sampler.position,
            "groups/generated": got.groups_generated,
            "groups/trained": got.groups_trained,
            "groups/rounds": got.rounds,
            "groups/probes": got.probes,
            "groups/errored": got.groups_errored,
            **errors,
        }
        unused = {
            "kl": self.ref_model is None,
            "is_ratio_mean": self.loss_cfg.is_correction == "none",
            "dual_clip_frac": self.loss_cfg.dual_clip_c is None,
        }
        row.update({k: v for k, v in reduced.items() if k not in row and not unused.get(k)})
        if diff_max is not None:  # beside rollout/logprob_diff_mean (from reduce_metrics)
            row[DIFF_MAX] = diff_max
        if self.parts.rollout.engine == "vllm":  # the colocated engine's refit is a no-op
            row["refit_time_s"] = refit_s
        row.update(rollout_metrics(got.rows, self.mode_weight))
        self._log_rollouts(got)
        log.info(
            "step %d | reward %.3f | acc %.3f | think_on %.3f | tokens %.1f",
            row["step"],
            row.get("reward/total", 0.0),
            row.get("acc", 0.0),
            row.get("think_on_rate", 0.0),
            row.get("response_tokens", 0.0),
        )
        return row

    def _log_rollouts(self, got) -> None:
        """Append this step's drawn prompt ids and example rollouts to rollouts.jsonl (rank 0;
        rows after a resumed step are dropped first)."""
        if self.rank != 0:
            return
        if not self._log_truncated:
            self._log_truncated = True
            keep = []
            if self.rollout_log.exists():
                for line in self.rollout_log.read_text().splitlines():
                    try:
                        if json.loads(line)["step"] < self.state.step:
                            keep.append(line + "\n")
                    except (json.JSONDecodeError, KeyError):
                        continue
            atomic_write_text(self.rollout_log, "".join(keep))
        row = {"step": self.state.step, "prompt_ids": got.prompt_ids, "examples": got.examples}
        with open(self.rollout_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
