"""One RL step's rollouts: prompts -> G completions each -> rewards -> group advantages.

Used by `kat train CFG.yaml` with `stage: rl` (`kat_megatron/rl/trainer.py`). Per round, every
rank draws the same prompts from the `PromptSampler`; data-parallel rank r generates a
contiguous block of them with the colocated engine (its TP group generates together). Request
j of the prompt drawn at sampler position q is seeded by `request_seed(seed, q * G + j)`, so a
rollout does not depend on the data-parallel size or batch composition. The first rank of the
TP group scores (verifiers, possibly a code sandbox) and broadcasts the scores to its group.

- Forced-mode probes (`rl.forced_probes=k`): a group whose rollouts lack a mode gets k more
  rollouts forced into that mode (`forced_mode_prefix`), scored as evidence for the mode reward.
- KL in the reward (`policy_loss.kl_in_reward`): answer rewards lose kl_coef x the summed
  per-token KL (rollout log-probs vs. the frozen reference) before the advantages.
- Dynamic sampling (`rl.dynamic_sampling`): groups without signal (`advantages.has_signal`)
  are dropped and up to `max_refill_rounds` more rounds draw the missing number of prompts;
  the first `prompts_per_step` groups with signal in draw order are trained on.
- Reward errors (`RolloutScore.error`: a verifier failed for an internal reason): a group with
  an errored rollout is dropped whole before its advantages (no advantages, no probes; the
  group size stays G), is never trained on and, with dynamic sampling, is refilled like a group
  without signal; an errored probe is no mode evidence. The errors are counted in the step's
  metrics (`reward_errors`, `reward_error_rate`, `groups/errored`). Scores (error strings
  included) reach the other TP ranks by `broadcast_object_list`, i.e. pickled whole.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from kat_megatron.data.autothink import MODES, forced_mode_prefix
from kat_megatron.data.tokenizer import encode_text
from kat_megatron.inference.sampling import request_seed
from kat_megatron.inference.types import Completion, SamplingParams
from kat_megatron.losses.policy import apply_kl_in_reward
from kat_megatron.rl.advantages import (
    GroupAdvantages,
    compute_advantages,
    has_signal,
    mode_token_ids,
    token_advantages,
)
from kat_megatron.rl.batching import RolloutSample
from kat_megatron.rl.parts import RLParts
from kat_megatron.rl.prompts import PromptRecord, PromptSampler, prompt_token_ids
from kat_megatron.rl.rewards import RolloutScore, score_rollout


@dataclass
class Group:
    """One prompt's rollouts on the rank that generated them."""

    key: tuple[int, int]
    """(round, index in the round's draw): the global order of groups within a step."""
    position: int
    """Sampler position the prompt was drawn at (seeds its requests)."""
    record: PromptRecord
    prompt_ids: list[int]
    completions: list[Completion]
    scores: list[RolloutScore] = field(default_factory=list)
    probes: list[RolloutScore] = field(default_factory=list)
    ref_logprobs: list[list[float]] | None = None
    adv: GroupAdvantages | None = None
    """None until `_advantages`, and for a dropped group (`reward_error`)."""

    @property
    def reward_error(self) -> str | None:
        """The first `error` among the group's rollout scores: the group is not trained on."""
        return next((s.error for s in self.scores if s.error is not None), None)


@dataclass
class StepRollouts:
    """What one step generated: this rank's trained groups and global summaries."""

    groups: list[Group]
    """This rank's groups to train on (after dynamic sampling)."""
    rows: list[dict[str, Any]]
    """Every rollout generated this step on any rank (metrics), in global order."""
    generated_tokens: int
    """Over all ranks, probes included."""
    generation_s: float
    """Slowest rank's generation time (engine calls)."""
    groups_generated: int
    groups_trained: int
    rounds: int
    probes: int
    prompt_ids: list[str]
    """Ids of the prompts drawn this step, in draw order (all rounds)."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    """The first `rl.log_rollouts` rollouts of this rank's first groups, with their text."""
    groups_errored: int = 0
    """Groups dropped because a rollout's reward failed (`Group.reward_error`), all ranks."""
    probe_errors: list[str] = field(default_factory=list)
    """`error` of every errored probe on any rank (rollouts' errors are in `rows`)."""


def _dp() -> tuple[int, int, Any]:
    return (
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_group(),
    )


def all_gather_dp(obj: Any) -> list[Any]:
    """`obj` of every data-parallel rank, in DP-rank order."""
    rank, size, group = _dp()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def _mp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size() * (
        parallel_state.get_pipeline_model_parallel_world_size()
    )


def is_mp_src() -> bool:
    """Whether this rank is the first of its model-parallel group (tensor x pipeline ranks of
    one replica): the one that scores rollouts and owns a vLLM worker."""
    return _mp_size() == 1 or dist.get_rank() == parallel_state.get_model_parallel_src_rank()


def broadcast_mp(obj: Any) -> Any:
    """`obj` of the first rank of this rank's model-parallel group (its TP x PP ranks), on all
    of them: every pipeline stage of a replica trains on the same rollouts."""
    if _mp_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(
        box,
        src=parallel_state.get_model_parallel_src_rank(),
        group=parallel_state.get_model_parallel_group(),
    )
    return box[0]


def rollout_seed(seed: int, kind: str) -> int:
    """A 63-bit base seed per run seed and kind of request (rollout, probe)."""
    digest = hashlib.sha256(f"kat-rl/{seed}/{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RolloutCollector:
    """Draws prompts and turns them into scored groups with advantages (see module doc)."""

    def __init__(
        self,
        engine,
        tokenizer,
        prompts: list[PromptRecord],
        sampler: PromptSampler,
        parts: RLParts,
        rl,
        seed: int,
        ref_logprobs_fn=None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.sampler = sampler
        self.sampling: SamplingParams = parts.sampling
        self.rewards = parts.rewards
        self.adv_cfg = parts.advantages
        self.loss_cfg = parts.policy_loss
        self.rl = rl
        self.seed = seed
        self.ref_logprobs_fn = ref_logprobs_fn
        """`fn(groups) -> None` filling `group.ref_logprobs` (collective over all ranks)."""
        self.mode_ids = mode_token_ids(tokenizer)
        stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.params = replace(self.sampling, stop_token_ids=sorted(set(stops)), seed=None)
        self._prompt_cache: dict[int, list[int]] = {}

    def prompt_ids(self, index: int) -> list[int]:
        """Token ids of prompt `index` rendered with the chat template + generation prompt."""
        if index not in self._prompt_cache:
            ids = prompt_token_ids(self.tokenizer, self.prompts[index].messages)
            self._prompt_cache[index] = ids
        return self._prompt_cache[index]

    # ----------------------------------------------------------------------------- one round
    def _generate(self, draw: list[tuple[int, int]], rnd: int) -> tuple[list[Group], float]:
        dp_rank, dp_size, _ = _dp()
        n = len(draw)
        lo, hi = dp_rank * n // dp_size, (dp_rank + 1) * n // dp_size
        g = self.rl.group_size
        groups = [
            Group((rnd, k), pos, self.prompts[idx], self.prompt_ids(idx), [])
            for k, (pos, idx) in list(enumerate(draw))[lo:hi]
        ]
        base = rollout_seed(self.seed, "rollout")
        prompts = [grp.prompt_ids for grp in groups for _ in range(g)]
        seeds = [request_seed(base, grp.position * g + j) for grp in groups for j in range(g)]
        start = time.perf_counter()
        # called with no prompts too: a vLLM worker shared by several replicas
        # (rl.rollout.replicas) and the first refit are collective over them
        out = self.engine.generate(prompts, self.params, seeds=seeds)
        elapsed = time.perf_counter() - start
        if not groups:
            return [], 0.0
        for i, grp in enumerate(groups):
            grp.completions = out[i * g : (i + 1) * g]
        return groups, elapsed

    def _score(self, groups: list[Group]) -> None:
        scores = None
        if is_mp_src():
            scores = [
                [
                    score_rollout(
                        c.text, len(c.token_ids), c.finish_reason, grp.record.meta, self.rewards
                    )
                    for c in grp.completions
                ]
                for grp in groups
            ]
        for grp, sc in zip(groups, broadcast_mp(scores)):
            grp.scores = sc

    def _probe(self, groups: list[Group]) -> tuple[int, float, int]:
        """Forced-mode probes for groups lacking a mode: (count, seconds, tokens)."""
        k = self.rl.forced_probes
        if not k:
            return 0, 0.0, 0
        jobs = []  # (group, missing mode)
        for grp in groups:
            if grp.reward_error is not None:  # dropped: its mode evidence is never used
                continue
            present = {s.mode for s in grp.scores}
            jobs += [(grp, m) for m in MODES if m not in present]
        base = rollout_seed(self.seed, "probe")
        prefixes = {m: forced_mode_prefix(m) for m in MODES}
        prefix_ids = {m: encode_text(self.tokenizer, p) for m, p in prefixes.items()}
        prompts, seeds = [], []
        for grp, m in jobs:
            for j in range(k):
                prompts.append(grp.prompt_ids + prefix_ids[m])
                seeds.append(request_seed(base, (grp.position * 2 + MODES.index(m)) * k + j))
        start = time.perf_counter()
        out = self.engine.generate(prompts, self.params, seeds=seeds)  # also with none
        elapsed = time.perf_counter() - start
        if not jobs:
            return 0, 0.0, 0
        scored = None
        if is_mp_src():
            scored = [
                score_rollout(
                    prefixes[m] + c.text,
                    len(c.token_ids),
                    c.finish_reason,
                    grp.record.meta,
                    self.rewards,
                    forced_mode=m,
                )
                for (grp, m), c in zip([jb for jb in jobs for _ in range(k)], out)
            ]
        scored = broadcast_mp(scored)
        for i, (grp, _) in enumerate(jobs):
            grp.probes = grp.probes + scored[i * k : (i + 1) * k]
        return len(out), elapsed, sum(len(c.token_ids) for c in out)

    def _advantages(self, groups: list[Group]) -> None:
        """Advantages of each group; a group with a reward error is dropped (`adv` None)."""
        cfg = self.loss_cfg
        for grp in groups:
            if grp.reward_error is not None:
                grp.adv = None
                continue
            scores = grp.scores
            if cfg.kl_in_reward and cfg.kl_coef > 0:
                t = max(len(c.logprobs) for c in grp.completions)
                logp_bt, ref_bt, mask_bt = (torch.zeros(len(scores), t) for _ in range(3))
                for b, (c, ref) in enumerate(zip(grp.completions, grp.ref_logprobs)):
                    n = len(c.logprobs)
                    logp_bt[b, :n], ref_bt[b, :n], mask_bt[b, :n] = (
                        torch.tensor(c.logprobs),
                        torch.tensor(ref),
                        1.0,
                    )
                rewards_b = torch.tensor([s.answer_reward for s in scores])
                new_b = apply_kl_in_reward(
                    rewards_b, logp_bt, ref_bt, cfg.kl_coef, mask_bt, cfg.kl_estimator
                )
                scores = [replace(s, answer_reward=float(r)) for s, r in zip(scores, new_b)]
            grp.adv = compute_advantages(scores, self.adv_cfg, grp.probes)

    # ----------------------------------------------------------------------------- one step
    def collect(self) -> StepRollouts:
        """Rollouts of one step (collective over all ranks)."""
        target = self.rl.prompts_per_step
        rounds = 1 + (self.rl.max_refill_rounds if self.rl.dynamic_sampling else 0)
        kept: list[Group] = []
        all_groups: list[Group] = []
        gen_s, tokens, probes, drawn_ids, n_kept, rnd = 0.0, 0, 0, [], 0, 0
        for rnd in range(rounds):
            first = self.sampler.position
            draw = [(first + i, idx) for i, idx in enumerate(self.sampler.take(target - n_kept))]
            drawn_ids += [self.prompts[idx].id for _, idx in draw]
            groups, secs = self._generate(draw, rnd)
            self._score(groups)
            n_probe, probe_s, probe_tok = self._probe(groups)
            if self.ref_logprobs_fn is not None:
                self.ref_logprobs_fn(groups)
            self._advantages(groups)
            gen_s += secs + probe_s
            tokens += probe_tok + sum(len(c.token_ids) for g in groups for c in g.completions)
            probes += n_probe
            all_groups += groups
            # a dropped group (reward error) is never trained on; dynamic sampling refills it
            signal = {g.key[1]: g.adv is not None and has_signal(g.adv) for g in groups}
            if not self.rl.dynamic_sampling:
                kept += [g for g in groups if g.adv is not None]
                break
            merged = {k: v for part in all_gather_dp(signal) for k, v in part.items()}
            quota = target - n_kept  # keep the first `quota` groups with signal in draw order
            chosen = [k for k in sorted(merged) if merged[k]][:quota]
            kept += [g for g in groups if g.key[1] in chosen]
            n_kept += len(chosen)
            if n_kept >= target:
                break
        stats = torch.tensor([gen_s, float(tokens), float(probes)], dtype=torch.float64)
        probe_errors = [p.error for g in all_groups for p in g.probes if p.error is not None]
        rows = [_rows(g) for g in all_groups]
        parts = all_gather_dp((stats.tolist(), rows, len(kept), probe_errors))
        return StepRollouts(
            groups=kept,
            rows=[r for p in parts for grp_rows in p[1] for r in grp_rows],
            generated_tokens=int(sum(p[0][1] for p in parts)),
            generation_s=max(p[0][0] for p in parts),
            groups_generated=sum(len(p[1]) for p in parts),
            groups_trained=sum(p[2] for p in parts),
            rounds=rnd + 1,
            probes=int(sum(p[0][2] for p in parts)),
            prompt_ids=drawn_ids,
            examples=self._examples(all_groups),
            groups_errored=sum(
                any(r["reward_error"] is not None for r in grp_rows)
                for p in parts
                for grp_rows in p[1]
            ),
            probe_errors=[e for p in parts for e in p[3]],
        )

    def _examples(self, groups: list[Group]) -> list[dict[str, Any]]:
        rows = [dict(r, text=c.text) for g in groups for r, c in zip(_rows(g), g.completions)]
        return rows[: self.rl.log_rollouts]

    def samples(self, groups: list[Group]) -> list[RolloutSample]:
        """Training rows of this rank's groups, with per-token (Step-SRPO) advantages."""
        out = []
        for grp in groups:
            for i, c in enumerate(grp.completions):
                idx = next((t for t, tok in enumerate(c.token_ids) if tok in self.mode_ids), None)
                adv = token_advantages(
                    grp.adv.a_judge[i], grp.adv.a_answer[i], idx, len(c.token_ids)
                )
                ref = grp.ref_logprobs[i] if grp.ref_logprobs is not None else None
                out.append(
                    RolloutSample(
                        grp.prompt_ids,
                        list(c.token_ids),
                        adv.tolist(),
                        list(c.logprobs),
                        ref,
                        routing=c.routing,
                    )
                )
        return out


def _rows(grp: Group) -> list[dict[str, Any]]:
    """Per-rollout facts of a group for the step metrics (small, picklable); `r_mode` is 0 in
    a dropped group (no advantages)."""
    adv = grp.adv
    return [
        {
            "key": grp.key,
            "prompt_id": grp.record.id,
            "category": grp.record.category,
            "mode": s.mode,
            "correct": s.correct,
            "format_ok": s.format_ok,
            "answer_reward": s.answer_reward,
            "components": dict(s.components),
            "r_mode": adv.r_mode[i] if adv is not None and adv.r_mode else 0.0,
            "tokens": len(c.token_ids),
            "truncated": c.finish_reason == "length",
            "reward_error": s.error,
        }
        for i, (s, c) in enumerate(zip(grp.scores, grp.completions))
    ]
