"""Evaluation of a model on verifiable prompts in auto and forced AutoThink modes.

`kat eval --ckpt runs/x/checkpoints --data prompts.jsonl --mode all` runs it (see
`kat_megatron/commands/eval.py`); in Python, with any object that has
`generate_text(prompts: list[str], params: SamplingParams) -> list[Completion]`:

    prompts = load_prompts("prompts.jsonl")
    samples = run_eval(engine, prompts, EvalConfig(modes=("auto", "think_on")))

A prompt is a JSON line in the `synthetic_tasks.prompt_record` format (the input format of
`kat data tag`): `{"id", "messages": [..., {"role": "user", ...}], "reference", "verifier",
"category"}` (`query` may replace `messages`; `category` defaults to "default").

Modes: `auto` continues the chat template's generation prompt (`...<judge>\\n`), so the model
writes its judge and picks its mode; `think_on`/`think_off` append
`autothink.forced_mode_prefix(mode, judge)`: the judge text, the mode token and
`<think>`/`<answer>`. With `forced_judge="model"` (default) the judge is the model's own (a first
pass generates up to `</judge>`, shared by both forced modes), so only the mode decision is
forced and token counts compare fairly with auto; with `"prefill"` it is the fixed text of
`forced_mode_prefix` (what `kat data tag` and forced RL probes prefill).
Each sample is scored by the prompt's verifier on the lenient-parsed answer of
`<judge>\\n + prefix + completion`; output tokens count the completion plus the forced prefix
(judge included), so every mode pays for its judge and mode token.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from kat_megatron.data.autothink import (
    END_TOKENS,
    GENERATION_PREFIX,
    JUDGE_CLOSE,
    MODES,
    find_tag,
    forced_mode_prefix,
    parse_lenient,
)
from kat_megatron.data.chat_template import render_chat
from kat_megatron.eval.datasets import (  # noqa: F401 (DEFAULT_CATEGORY, EvalPrompt: re-exported)
    DEFAULT_CATEGORY,
    EvalDataConfig,
    EvalPrompt,
    load_eval_data,
)
from kat_megatron.eval.metrics import SampleResult
from kat_megatron.inference.types import Completion, SamplingParams

log = logging.getLogger("kat")

EVAL_MODES = ("auto", *MODES)
FORCED_JUDGES = ("model", "prefill")


class TextEngine(Protocol):
    """What evaluation needs of a generator (`kat_megatron.inference.engine.RolloutEngine` fits)."""

    def generate_text(self, prompts: list[str], params: SamplingParams) -> list[Completion]: ...


@dataclass
class EvalConfig:
    """What to generate: modes, samples per prompt and the sampling parameters."""

    modes: tuple[str, ...] = ("auto",)
    """Any of auto, think_on, think_off (in this order of evaluation)."""
    samples: int = 1
    """K samples per prompt: accuracy is pass@1 (the mean), pass@K is reported when K > 1."""
    temperature: float = 0.0
    """0: greedy (then K > 1 repeats the same answer)."""
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    """Seed of the samplers (sample k of prompt i gets its own generator)."""
    forced_judge: str = "model"
    """Judge text of forced modes: "model" (the model's own, generated first) or "prefill"
    (`forced_mode_prefix`'s fixed text)."""
    chunk_size: int = 64
    """Prompts per `generate_text` call (one progress step)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Ids that end an answer (`<|im_end|>`, `<|endoftext|>`; see `stop_ids`)."""

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        if not self.modes or any(m not in EVAL_MODES for m in self.modes):
            raise ValueError(f"modes={list(self.modes)}: expected some of {list(EVAL_MODES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes={list(self.modes)}: each mode at most once")
        if self.forced_judge not in FORCED_JUDGES:
            raise ValueError(
                f"forced_judge={self.forced_judge!r}: expected one of {list(FORCED_JUDGES)}"
            )
        if self.samples < 1:
            raise ValueError(f"samples: expected >= 1, got {self.samples}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {self.chunk_size}")
        self.params()  # validates temperature, top_p, max_new_tokens

    def params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=list(self.stop_token_ids),
            seed=self.seed,
        )


def stop_ids(tokenizer: Any) -> list[int]:
    """Ids of the end tokens (`<|im_end|>`, `<|endoftext|>`) that `tokenizer` knows."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in END_TOKENS if t in vocab]


def load_prompts(
    data: str | os.PathLike | EvalDataConfig, default_verifier: str = "exact_match"
) -> list[EvalPrompt]:
    """Prompts of `data`: a path (JSONL of prompt records, or a standard set read with its own
    column names) or an `EvalDataConfig` (whose `verifier` then replaces `default_verifier`);
    see `kat_megatron/eval/datasets.py`. In a JSONL of prompt records any bad line (blank lines
    aside) raises ValueError naming `file:line` and the reason (up to 10 lines are listed)."""
    if not isinstance(data, EvalDataConfig):
        data = EvalDataConfig(data, verifier=default_verifier)
    return load_eval_data(data)


def mode_prefix(mode: str, judge: str | None = None) -> str:
    """Text appended after the generation prompt: '' for auto, else the forced prefix (with
    `judge` as its judge text; None: `forced_mode_prefix`'s default)."""
    if mode not in EVAL_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {list(EVAL_MODES)}")
    if mode == "auto":
        return ""
    return forced_mode_prefix(mode) if judge is None else forced_mode_prefix(mode, judge)


def judge_text(completion_text: str) -> str | None:
    """The judge body of a first-pass completion (up to `</judge>`), or None when it has none
    (no `</judge>`, empty, or holding another special token)."""
    if JUDGE_CLOSE not in completion_text:
        return None
    body = completion_text.split(JUDGE_CLOSE)[0].strip()
    return body if body and find_tag(body) is None else None


def score_sample(
    prompt: EvalPrompt,
    mode: str,
    sample: int,
    completion: Completion,
    prefix: str = "",
    prefix_tokens: int = 0,
) -> SampleResult:
    """Parse and verify one completion of `prompt` generated in `mode` after `prefix`."""
    from kat_megatron.verifiers import get_verifier

    output = GENERATION_PREFIX + prefix + completion.text
    parsed = parse_lenient(output)
    correct = bool(get_verifier(prompt.verifier)(parsed.answer, prompt.reference).correct)
    return SampleResult(
        id=prompt.id,
        category=prompt.category,
        mode=mode,
        sample=sample,
        output=output,
        answer=parsed.answer,
        correct=correct,
        format_valid=parsed.well_formed,
        parsed_mode=parsed.mode,
        output_tokens=len(completion.token_ids) + prefix_tokens,
        finish_reason=completion.finish_reason,
    )


def _generate(
    engine: TextEngine, texts: list[str], params: SamplingParams, cfg: EvalConfig, seed: int,
    desc: str, progress: bool,
) -> list[Completion]:  # fmt: skip
    """`generate_text` over chunks of `cfg.chunk_size`, with a progress bar and a distinct
    base seed per chunk (every answer gets its own sampler stream)."""
    outs: list[Completion] = []
    bar = _progress_bar(len(texts), desc, progress)
    for lo in range(0, len(texts), cfg.chunk_size):
        chunk = texts[lo : lo + cfg.chunk_size]
        got = engine.generate_text(chunk, replace(params, seed=seed + lo))
        if len(got) != len(chunk):
            raise RuntimeError(f"engine returned {len(got)} completions for {len(chunk)} prompts")
        outs.extend(got)
        bar.update(len(chunk))
    bar.close()
    return outs


def run_eval(
    engine: TextEngine,
    prompts: Sequence[EvalPrompt],
    cfg: EvalConfig,
    count_tokens: Callable[[str], int] | None = None,
    progress: bool = True,
) -> list[SampleResult]:
    """Generate and score `cfg.samples` answers per prompt in every mode of `cfg`.

    `count_tokens(text)` counts a forced prefix's tokens (default: the engine's `encode`, else 0).
    Collective when the engine is (every TP rank calls it with the same arguments).
    """
    if count_tokens is None:
        encode = getattr(engine, "encode", None)
        count_tokens = (lambda text: len(encode(text))) if encode is not None else (lambda _: 0)
    params = cfg.params()
    jobs = [(p, k) for p in prompts for k in range(cfg.samples)]
    bases = [render_chat(p.messages, add_generation_prompt=True) for p, _ in jobs]
    judges: list[str | None] = [None] * len(jobs)
    forced = [m for m in cfg.modes if m != "auto"]
    if forced and cfg.forced_judge == "model":
        first = replace(params, stop_strings=[*params.stop_strings, JUDGE_CLOSE])
        outs = _generate(engine, bases, first, cfg, cfg.seed + 7919, "eval judge", progress)
        judges = [judge_text(o.text) for o in outs]
        missing = sum(j is None for j in judges)
        if missing:
            log.warning("eval: %d of %d first passes wrote no judge; their forced modes use "
                        "the fixed judge text", missing, len(jobs))  # fmt: skip
    results: list[SampleResult] = []
    for m, mode in enumerate(cfg.modes):
        start = time.perf_counter()
        prefixes = [mode_prefix(mode, judge) for judge in judges]
        texts = [base + prefix for base, prefix in zip(bases, prefixes)]
        outs = _generate(engine, texts, params, cfg, cfg.seed + m * len(jobs), f"eval {mode}",
                         progress)  # fmt: skip
        for (p, k), prefix, out in zip(jobs, prefixes, outs):
            n_prefix = count_tokens(prefix) if prefix else 0
            results.append(score_sample(p, mode, k, out, prefix, n_prefix))
        mine = results[-len(jobs) :]
        log.info("eval %s: %d prompts x %d samples in %.1f s, accuracy %.3f",
                 mode, len(prompts), cfg.samples, time.perf_counter() - start,
                 sum(s.correct for s in mine) / max(len(mine), 1))  # fmt: skip
    return results


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on global rank 0 when enabled, else a no-op."""
    if not enabled or int(os.environ.get("RANK", "0")) != 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="answer", dynamic_ncols=True, leave=False)
