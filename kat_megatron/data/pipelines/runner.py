"""Run a pipeline's per-record function over an input file: threads, resume, outputs, summary.

Library side of `kat data {tag,synthesize,coldstart}`. Records are processed concurrently
(`client.max_concurrency` at a time); each finished record is appended to OUTPUT/.work's log at
once, so an interrupted run resumes where it stopped, and every LLM answer is cached on disk, so
a record interrupted half-way re-sends only the requests that had not been answered. A record
whose requests fail for good is reported as failed (a rerun retries it); outputs are written
when all records are done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kat_megatron.data.autothink import MODES
from kat_megatron.data.llm_client import ClientPool, Completion
from kat_megatron.data.pipelines.config import PipelineConfig, RoleConfig
from kat_megatron.data.pipelines.io import (
    InputRecord,
    LengthMeter,
    WorkLog,
    percentiles,
    read_records,
    write_outputs,
)

logger = logging.getLogger(__name__)

MAX_LISTED = 1000
"""Malformed lines and failed records listed individually in summary.json (all are counted)."""
_NOT_FINGERPRINTED = ("input", "output", "client", "limit", "resume", "progress", "tokenizer")


@dataclass
class Outcome:
    """What processing one record produced."""

    status: str
    """'kept' or 'rejected'."""
    row: dict[str, Any]
    reason: str | None = None
    """Why a record was rejected."""
    events: Counter = field(default_factory=Counter)
    """Per-record counters summed into the summary (e.g. malformed model outputs)."""


class PipelineContext:
    """What a record function needs: config, LLM clients, verifiers, the length meter."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.pool = ClientPool(dataclasses.replace(cfg.client, cache_dir=cfg.cache_dir))
        self.meter = LengthMeter(cfg.tokenizer)
        self._verifiers: dict[str, Any] = {}

    def verifier(self, name: str) -> Any:
        from kat_megatron.verifiers import get_verifier

        if name not in self._verifiers:  # benign race: two threads may build one each
            self._verifiers[name] = get_verifier(name)
        return self._verifiers[name]

    def ask(
        self, role: RoleConfig, messages: list[dict[str, str]], index: int, tag: str
    ) -> Completion:
        """Chat request of `role` (its system prompt first); sample `index` uses seed + index."""
        system = [{"role": "system", "content": role.system_prompt}] if role.system_prompt else []
        client = self.pool.get(role.base_url)
        params = role.params(self.cfg.seed + index)
        return client.chat(role.model, system + messages, cache_tag=f"{tag}/{index}", **params)

    def complete(
        self, role: RoleConfig, prompt: str, index: int, tag: str, stop: list[str] | None = None
    ) -> Completion:
        """Raw-prompt request of `role` (prefill); stops at `<|im_end|>` (and `stop`)."""
        client = self.pool.get(role.base_url)
        params = {**role.params(self.cfg.seed + index), "stop": ["<|im_end|>", *(stop or [])]}
        return client.complete(role.model, prompt, cache_tag=f"{tag}/{index}", **params)


def config_fingerprint(cfg: PipelineConfig) -> str:
    """sha256 of the fields that change what a record produces."""
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    data["pipeline"] = type(cfg).__name__
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _drive(
    records: list[InputRecord],
    process: Callable[[InputRecord], Outcome],
    log: WorkLog,
    workers: int,
    progress: bool,
    desc: str,
) -> list[dict[str, Any]]:
    """Process records not yet in `log`, at most 2 x workers queued; return the failures."""
    todo = [r for r in records if r.id not in log.done]
    failed: list[dict[str, Any]] = []
    pending: dict[Future, InputRecord] = {}
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kat-data")
    bar = tqdm(
        total=len(records), initial=len(records) - len(todo), desc=desc, disable=not progress
    )

    def collect(done: Iterable[Future]) -> None:
        for fut in done:
            rec = pending.pop(fut)
            try:
                out = fut.result()
            except Exception as err:  # a record's requests failed for good, or a bug
                logger.warning("record %s (line %d) failed: %s", rec.id, rec.line, err)
                failed.append({"id": rec.id, "line": rec.line, "error": str(err)[:500]})
            else:
                log.append(_entry(rec, out))
            bar.update()

    try:
        for rec in todo:
            while len(pending) >= 2 * workers:
                collect(wait(pending, return_when=FIRST_COMPLETED).done)
            pending[pool.submit(process, rec)] = rec
        while pending:
            collect(wait(pending, return_when=FIRST_COMPLETED).done)
    finally:
        pool.shutdown(wait=not pending, cancel_futures=True)
        bar.close()
    return failed


def _entry(rec: InputRecord, out: Outcome) -> dict[str, Any]:
    if out.status not in ("kept", "rejected"):
        raise AssertionError(f"bad outcome status {out.status!r}")
    return {
        "id": rec.id,
        "line": rec.line,
        "status": out.status,
        "reason": out.reason,
        "events": dict(out.events),
        "row": out.row,
    }


def _mode_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(r.get("mode") for r in rows if r.get("mode") in MODES)
    total = sum(counts.values())
    return {
        "mode_counts": {m: counts.get(m, 0) for m in MODES},
        "mode_ratio": {m: round(counts.get(m, 0) / total, 4) if total else 0.0 for m in MODES},
    }


def build_summary(
    name: str,
    cfg: PipelineConfig,
    n_lines: int,
    malformed: list[dict[str, Any]],
    entries: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    requests: dict[str, int],
    lengths: Callable[[dict[str, Any]], Iterable[tuple[str, int]]],
    unit: str,
) -> dict[str, Any]:
    """The summary.json mapping (see docs/autothink_data.md)."""
    kept = [e["row"] for e in entries if e["status"] == "kept"]
    by_mode: dict[str, list[int]] = {m: [] for m in MODES}
    for row in kept:
        for mode, n in lengths(row):
            by_mode[mode].append(n)
    events: Counter = Counter()
    for e in entries:
        events.update(e.get("events", {}))
    reasons = Counter(e["reason"] for e in entries if e["status"] == "rejected")
    return {
        "pipeline": name,
        "input": cfg.input,
        "output": cfg.output,
        "counts": {
            "lines": n_lines,
            "malformed": len(malformed),
            "records": n_lines - len(malformed),
            "processed": len(entries),
            "kept": len(kept),
            "rejected": len(entries) - len(kept),
            "failed": len(failed),
        },
        **_mode_stats(kept),
        "length_unit": unit,
        "length_percentiles": {m: percentiles(v) for m, v in by_mode.items()},
        "rejected_reasons": dict(reasons),
        "events": dict(sorted(events.items())),
        "requests": requests,
        "malformed": malformed[:MAX_LISTED],
        "failed": failed[:MAX_LISTED],
    }


def run_pipeline(
    name: str,
    cfg: PipelineConfig,
    process: Callable[[PipelineContext, InputRecord], Outcome],
    check: Callable[[InputRecord], None] | None,
    lengths: Callable[[dict[str, Any]], Iterable[tuple[str, int]]],
    extra_summary: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Read, process (resumably), write outputs; return the summary."""
    records, malformed = read_records(cfg.input, cfg.default_verifier, check)
    n_lines = len(records) + len(malformed)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    for m in malformed[:20]:
        logger.warning("%s line %d: %s", cfg.input, m["line"], m["reason"])
    log = WorkLog(Path(cfg.output) / ".work", config_fingerprint(cfg), cfg.resume)
    ctx = PipelineContext(cfg)
    try:
        failed = _drive(
            records,
            lambda rec: process(ctx, rec),
            log,
            cfg.client.max_concurrency,
            cfg.progress,
            f"kat data {name}",
        )
    finally:
        log.close()
        ctx.pool.close()
    entries = [log.done[r.id] for r in records if r.id in log.done]
    summary = build_summary(
        name, cfg, n_lines, malformed, entries, failed, ctx.pool.stats(), lengths, ctx.meter.unit
    )
    kept = [e["row"] for e in entries if e["status"] == "kept"]
    if extra_summary is not None:
        summary.update(extra_summary(kept))
    rejected = [{**e["row"], "reason": e["reason"]} for e in entries if e["status"] == "rejected"]
    write_outputs(cfg.output, kept, rejected, summary, cfg.progress)
    return summary
