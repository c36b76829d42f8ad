"""The rollout engine (`kat serve --ckpt DIR` serves it): KV-cached sampling on Megatron-Core.

In Python (`kat_megatron.inference.loading.engine_from_checkpoint`):

    engine, tokenizer, cfg = engine_from_checkpoint("runs/tiny_pretrain/checkpoints")
    engine.generate_text(["2 plus 3 is"], SamplingParams(temperature=0, max_new_tokens=8))

Each forward pass goes through Megatron-Core's `GPTInferenceWrapper` with a
`StaticInferenceContext` (its KV cache), i.e. the legacy static path, which runs on CPU and at any
TP; we drive the decode loop ourselves, as Megatron-Core's `TextGenerationController` does for a
static batch, because its sampler lacks what RL needs (top-k with top-p, several stop tokens,
stop strings, a seed per request). A batch keeps its prompts left-aligned: the first pass
prefills every prompt up to the shortest prompt's length, then each pass feeds one position per
sequence (a prompt token for prompts not yet consumed, else the token sampled last).

- Collective: every rank of the tensor-parallel group calls `generate` with the same arguments.
  TP ranks see the same gathered logits; the sampled ids and log-probs are still broadcast from
  the group's first rank, so every rank returns the same completions.
- Colocated with training: the engine holds the live `GPTModel` and reads its parameters, so an
  optimizer step is visible to the next `generate` without copying. Nothing derived from the
  weights outlives a batch (the KV cache is per batch; Megatron-Core's cached rotary tables
  depend on positions only), so `refit()` has nothing to invalidate; it pushes the new weights to
  an external engine when a `WeightSync` is set (see `weight_sync`). During `generate` the model
  is switched to eval mode, without sequence parallelism and without its MTP heads (Megatron-
  Core's static inference path supports neither) and is restored afterwards. Passes run under
  `torch.no_grad()`, not `inference_mode()`, so no inference tensor can reach a cache that a
  later training step reads.
- Pipeline parallelism is not supported for rollouts (pp must be 1).
- `generate(..., on_step=f)` (off by default) calls `f(events)` after every decode step with
  `(index, token_id, logprob, finish_reason | None)` for each sequence that sampled a token in
  that step (`index` into `prompts`; `finish_reason` set on a sequence's last token). It is a
  local call on whichever rank passes it (`kat serve` streams through rank 0's): no collective,
  so `f` must not raise and should be cheap (it runs inside the lockstep decode loop).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
    GPTInferenceWrapper,
)
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
    InferenceWrapperConfig,
)
from megatron.core.transformer.utils import set_model_to_sequence_parallel
from megatron.core.utils import unwrap_model

from kat_megatron.config.schema import ModelConfig
from kat_megatron.data.autothink import forced_mode_prefix
from kat_megatron.data.chat_template import render_chat
from kat_megatron.data.tokenizer import encode_text
from kat_megatron.inference.sampling import (
    StopStrings,
    request_seed,
    sample_tokens_b,
    token_logprobs_b,
)
from kat_megatron.inference.types import Completion, SamplingParams
from kat_megatron.inference.weight_sync import (
    NoWeightSync,
    WeightSync,
    hf_state_dict,
    is_refit_owner,
)

log = logging.getLogger("kat")

_CONTEXT_ROUND = 64
"""KV-cache lengths are rounded up to a multiple of this (fewer distinct rotary tables)."""

StepEvent = tuple[int, int, float, str | None]
"""`(index, token_id, logprob, finish_reason | None)`: one sequence's token of one decode step."""
OnStep = Callable[[list[StepEvent]], None]


class RolloutEngine:
    """Generates completions with the live model; see the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_sequence_length: int,
        max_batch_size: int = 64,
        params_dtype: torch.dtype = torch.float32,
        weight_sync: WeightSync | None = None,
        model_config: ModelConfig | None = None,
        seed: int = 0,
        routing_recorder=None,
    ) -> None:
        if isinstance(model, (list, tuple)):
            if len(model) != 1:
                raise ValueError(
                    "RolloutEngine: expected one model chunk (pipeline-parallel "
                    "or virtual-pipeline models are not supported for rollouts)"
                )
            model = model[0]
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError(
                "RolloutEngine: pipeline parallelism is not supported for rollouts "
                "(parallel.pp must be 1; use tensor parallelism)"
            )
        if max_sequence_length < 2 or max_batch_size < 1:
            raise ValueError(
                f"RolloutEngine: expected max_sequence_length >= 2 and max_batch_size >= 1, got "
                f"{max_sequence_length} and {max_batch_size}"
            )
        self.model = unwrap_model(model)
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.max_batch_size = max_batch_size
        self.params_dtype = params_dtype
        self.weight_sync: WeightSync = weight_sync or NoWeightSync()
        self.model_config = model_config
        if not isinstance(self.weight_sync, NoWeightSync) and model_config is None:
            raise ValueError("RolloutEngine: weight_sync needs model_config (HF tensor names)")
        self.seed = seed
        self.routing_recorder = routing_recorder
        """MoE router replay: `start(b, total, k)`, `add(start, end)` after each forward pass,
        `routing(row, n)`, `stop()` (`rl.router_replay.EngineRecorder`); None: no recording."""
        self.weights_version = 0
        self.stats = {"calls": 0, "sequences": 0, "generated_tokens": 0, "forward_passes": 0,
                      "seconds": 0.0}  # fmt: skip
        config = self.model.config
        self.padded_vocab_size = self.model.vocab_size
        self.vocab_size = min(len(tokenizer), self.padded_vocab_size)
        self._wrapper_config = InferenceWrapperConfig(
            hidden_size=config.hidden_size,
            params_dtype=params_dtype,
            inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=self.padded_vocab_size,
            inference_max_requests=max_batch_size,
            inference_max_seq_length=max_sequence_length,
        )

    # ----------------------------------------------------------------------------- public API
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        *,
        seeds: list[int] | None = None,
        on_step: OnStep | None = None,
    ) -> list[Completion]:
        """Completions of `prompts` (token ids), in order; collective over the TP group.

        `params` is one `SamplingParams` for every prompt or one per prompt (`kat serve` batches
        requests with different temperatures, lengths and stops into one call this way; a row's
        tokens depend only on its own parameters, logits and seed).
        Request i samples from its own generator, seeded by `request_seed(params.seed, i)`, or by
        `seeds[i]` when given (e.g. the server: one seed per HTTP request and sample). With
        `params.seed=None` the engine's call counter provides the seed, identically on all ranks.
        A prompt leaves room for at most `max_sequence_length - len(prompt)` new tokens.
        `on_step` receives each decode step's tokens as they are sampled (module docstring).
        """
        self.check_prompts(prompts)
        if not prompts:  # nothing to do (the rollout collector calls with none on some ranks)
            return []
        rows = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(rows) != len(prompts) or not all(isinstance(r, SamplingParams) for r in rows):
            raise ValueError(f"params: expected one SamplingParams or {len(prompts)} of them")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds: expected {len(prompts)} values, got {len(seeds)}")
        if seeds is None:
            base = rows[0].seed if rows else None
            if base is None:  # the n-th call of this engine: the same on every rank
                base = request_seed(self.seed, -1 - self.stats["calls"])
            seeds = [request_seed(base, i) for i in range(len(prompts))]
        self.stats["calls"] += 1
        start = time.perf_counter()
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[Completion | None] = [None] * len(prompts)
        with self._inference_layout():
            for lo in range(0, len(order), self.max_batch_size):
                idx = order[lo : lo + self.max_batch_size]
                batch = self._generate_batch(
                    [prompts[i] for i in idx], [rows[i] for i in idx], [seeds[i] for i in idx],
                    on_step, idx,
                )  # fmt: skip
                for i, completion in zip(idx, batch):
                    out[i] = completion
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["sequences"] += len(prompts)
        self.stats["generated_tokens"] += sum(len(c.token_ids) for c in out)
        return out  # type: ignore[return-value]

    def generate_text(
        self, prompts: list[str], params: SamplingParams, *, mode: str | None = None
    ) -> list[Completion]:
        """`generate` on raw text prompts (no template added). With `mode` (`think_on` or
        `think_off`), `autothink.forced_mode_prefix(mode)` is appended to every prompt: use it
        after a chat prompt that ends with the generation prompt `...<judge>\\n`."""
        suffix = forced_mode_prefix(mode) if mode is not None else ""
        return self.generate([self.encode(p + suffix) for p in prompts], params)

    def generate_chat(
        self, conversations: list[list[dict]], params: SamplingParams, *, mode: str | None = None
    ) -> list[Completion]:
        """`generate_text` on chat conversations rendered with the AutoThink template and its
        generation prompt (completions continue after `<|im_start|>assistant\\n<judge>\\n`)."""
        texts = [render_chat(c, add_generation_prompt=True) for c in conversations]
        return self.generate_text(texts, params, mode=mode)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special tokens in the text are kept; no BOS/EOS added)."""
        return encode_text(self.tokenizer, text)

    def refit(self) -> None:
        """Call after every optimizer step (all ranks). The colocated engine reads the live
        parameters, so there is nothing to reload; with a `WeightSync`, the weights are gathered
        into Hugging Face names and pushed by the first replica's refit owner (collective over
        the model-parallel groups, and at EP > 1 over every replica: expert-parallel groups span
        them)."""
        self.weights_version += 1
        if isinstance(self.weight_sync, NoWeightSync):
            return
        first = parallel_state.get_data_parallel_rank() == 0
        if not first and parallel_state.get_expert_model_parallel_world_size() == 1:
            return  # every data-parallel replica holds the same weights
        state = hf_state_dict(self.model, self.model_config)
        if first and is_refit_owner():
            self.weight_sync.push(state, self.weights_version)

    def check_prompts(self, prompts: list[list[int]]) -> None:
        """Raise ValueError unless every prompt is a non-empty list of ids in the padded vocabulary
        that leaves room to generate (local, no collective: `kat serve` checks each request)."""
        if not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts: expected a list of token-id lists")
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or not p:
                raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise ValueError(f"prompts[{i}]: expected integer token ids")
            if len(p) >= self.max_sequence_length:
                raise ValueError(
                    f"prompts[{i}]: {len(p)} tokens leave no room to generate within "
                    f"max_sequence_length={self.max_sequence_length}"
                )
            if min(p) < 0 or max(p) >= self.padded_vocab_size:
                raise ValueError(
                    f"prompts[{i}]: token ids must lie in [0, {self.padded_vocab_size})"
                )

    # ----------------------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _inference_layout(self) -> Iterator[None]:
        """Eval mode, no sequence parallelism, no MTP heads; everything restored on exit."""
        model, config = self.model, self.model.config
        was_training, sp, mtp = model.training, config.sequence_parallel, config.mtp_num_layers
        mtp_process = getattr(model, "mtp_process", False)
        if sp:
            tp, ep = config.tensor_model_parallel_size, config.expert_model_parallel_size
            if config.num_moe_experts and tp > 1 and ep == 1:
                raise ValueError(
                    "RolloutEngine: an MoE model with tensor parallelism needs expert "
                    "parallelism too (Megatron-Core's static inference keeps sequence "
                    "parallelism only inside MoE layers); use tp=1 or ep>1"
                )
            exclude = None
            if config.num_moe_experts:
                from megatron.core.transformer.moe.moe_layer import BaseMoELayer

                exclude = [BaseMoELayer]
            set_model_to_sequence_parallel(model, False, exclude_modules=exclude)
        if mtp:
            config.mtp_num_layers, model.mtp_process = None, False
        try:
            with torch.no_grad():
                yield
        finally:
            if sp:
                set_model_to_sequence_parallel(model, True)
            if mtp:
                config.mtp_num_layers, model.mtp_process = mtp, mtp_process
            model.train(was_training)

    def _tp_sync(self, ids_b: torch.Tensor, logprobs_b: torch.Tensor) -> tuple[list, list]:
        """Ids and log-probs of the TP group's first rank, on every rank of the group."""
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            both = torch.stack([ids_b.double(), logprobs_b.double()])
            dist.broadcast(
                both,
                src=parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
            ids_b, logprobs_b = both[0].long(), both[1]
        return ids_b.tolist(), logprobs_b.float().tolist()

    def _generate_batch(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        seeds: list[int],
        on_step: OnStep | None = None,
        index: list[int] | None = None,
    ) -> list[Completion]:
        """One static batch (at most max_batch_size prompts, sorted by length, `params[b]` for
        row b); `on_step` gets `index[b]` for row b."""
        b_n = len(prompts)
        index = list(range(b_n)) if index is None else index
        lens = [len(p) for p in prompts]
        limits = [min(q.max_new_tokens, self.max_sequence_length - n) for q, n in zip(params, lens)]
        total = max(n + k for n, k in zip(lens, limits))
        device = next(self.model.parameters()).device
        tokens = torch.zeros(b_n, total, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, : lens[b]] = torch.tensor(p, dtype=torch.long)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        stop_strings: dict[tuple[str, ...], StopStrings] = {}
        stops = [stop_strings.setdefault(tuple(q.stop_strings),
                                         StopStrings(self.tokenizer, q.stop_strings))
                 for q in params]  # fmt: skip
        stop_ids = [set(q.stop_token_ids) for q in params]
        gen: list[list[int]] = [[] for _ in prompts]
        logps: list[list[float]] = [[] for _ in prompts]
        finish = ["length"] * b_n
        done = [False] * b_n

        ctx_len = min(-(-total // _CONTEXT_ROUND) * _CONTEXT_ROUND, self.max_sequence_length)
        context = StaticInferenceContext(b_n, ctx_len)
        wrapper = GPTInferenceWrapper(self.model, self._wrapper_config, context)
        wrapper.prep_model_for_inference()  # eval mode, context reset (prefill)
        inputs = wrapper.prep_inference_input(tokens)
        start, end = 0, min(lens)
        rec = self.routing_recorder
        if rec is not None:
            rec.start(b_n, total, self.model.config.moe_router_topk)
        try:
            while True:
                window = wrapper.get_batch_for_context_window(inputs, start, end)
                logits_bv = wrapper.forward_pass_without_pipeline_parallel(window)[:, -1, :]
                self.stats["forward_passes"] += 1
                if rec is not None:
                    rec.add(start, end)
                active = [b for b in range(b_n) if not done[b] and lens[b] <= end]
                if active:
                    rows = logits_bv[active]
                    ids_b = self._sample(rows, [params[b] for b in active],
                                         [generators[b] for b in active])  # fmt: skip
                    ids, lps = self._tp_sync(ids_b, token_logprobs_b(rows, ids_b))
                    for b, tok, lp in zip(active, ids, lps):
                        tokens[b, end] = tok
                        gen[b].append(tok)
                        logps[b].append(lp)
                        if tok in stop_ids[b] or (stops[b] and stops[b].hit(gen[b])):
                            done[b], finish[b] = True, "stop"
                        elif len(gen[b]) >= limits[b]:
                            done[b] = True
                    if on_step is not None:
                        on_step([(index[b], gen[b][-1], logps[b][-1], finish[b] if done[b] else None)
                                 for b in active])  # fmt: skip
                if all(done):
                    break
                if not context.is_decode_only() and all(n <= end for n in lens):
                    context.enable_decode_mode()  # every prompt is in the cache
                start, end = end, end + 1
            routing = [rec.routing(b, lens[b] + len(gen[b]) - 1) if rec else None
                       for b in range(b_n)]  # fmt: skip
        finally:
            if rec is not None:
                rec.stop()
        return [
            Completion(
                prompt_ids=list(prompts[b]),
                token_ids=gen[b],
                logprobs=logps[b],
                text=self.tokenizer.decode(gen[b]),
                finish_reason=finish[b],
                routing=routing[b],
            )
            for b in range(b_n)
        ]

    def _sample(
        self, rows_bv: torch.Tensor, params: list[SamplingParams], generators: list
    ) -> torch.Tensor:
        """One id per row, each row sampled with its own parameters: rows that share the
        filters (temperature, top-k, top-p) are sampled together, each from its own generator."""
        groups: dict[tuple, list[int]] = {}
        for r, q in enumerate(params):
            groups.setdefault((q.temperature, q.top_k, q.top_p), []).append(r)
        if len(groups) == 1:
            return sample_tokens_b(rows_bv, params[0], generators, self.vocab_size)
        ids_b = torch.empty(len(params), dtype=torch.long, device=rows_bv.device)
        for rs in groups.values():
            at = torch.tensor(rs, device=rows_bv.device)
            ids_b[at] = sample_tokens_b(rows_bv[at], params[rs[0]], [generators[r] for r in rs],
                                        self.vocab_size)  # fmt: skip
        return ids_b

    def describe(self) -> dict[str, Any]:
        """Sizes and counters, for logs and `/v1/models`."""
        return {
            "max_sequence_length": self.max_sequence_length,
            "max_batch_size": self.max_batch_size,
            "vocab_size": self.vocab_size,
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "weights_version": self.weights_version,
            **self.stats,
        }
