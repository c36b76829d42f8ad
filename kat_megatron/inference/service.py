"""Lockstep generation for `kat serve`: rank 0 queues requests, every TP rank runs `generate`.

`kat serve --ckpt DIR --nproc 2` runs one `LockstepService` per rank. HTTP threads on rank 0
`submit(...)` work and block until it is done. Rank 0's `run()` loop takes whatever is queued,
checks each job's prompts locally (`RolloutEngine.check_prompts`: a bad job fails alone, before
anything is broadcast), merges the rest into one `RolloutEngine.generate` call with per-prompt
sampling parameters (each job keeps its own temperature, length, stops and seeds), and
broadcasts the batch to the other ranks, whose `run()` loop receives it and calls `generate`
with the same arguments (the engine is collective over TP). An unexpected exception in a batch
fails that batch's jobs (HTTP 500) and the loop goes on serving.
When idle, rank 0 broadcasts an empty batch every `heartbeat_s` so that the other ranks' waits
never reach the process group's timeout. `request_stop()` (safe in a signal handler: it only
sets a flag) makes rank 0 finish the batch in progress, fail queued work, broadcast "stop", and
every rank's `run()` return.

`stream(...)` is `submit` for `stream: true`: rank 0 passes the engine an `on_step` callback (a
local call, no collective; the other ranks pass none) that puts each decode step's tokens on the
job's queue, and the HTTP thread iterates them while the batch is still decoding.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist

from kat_megatron.inference.types import Completion, SamplingParams

if TYPE_CHECKING:
    from kat_megatron.inference.engine import StepEvent

log = logging.getLogger("kat")


class ServiceStopped(RuntimeError):
    """The service is shutting down; the work was not run."""


@dataclass
class _Job:
    prompts: list[list[int]]
    params: SamplingParams
    seeds: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Completion] | None = None
    error: BaseException | None = None
    events: queue.Queue | None = None
    """Streamed jobs: each step's `StepEvent`s (indices local to the job), then None at the end."""

    def finish(self, result: list[Completion] | None = None, error: BaseException | None = None):
        self.result, self.error = result, error
        self.done.set()
        if self.events is not None:
            self.events.put(None)


class Stream:
    """A streamed job (`LockstepService.stream`): iterate for lists of `StepEvent`s as they are
    sampled; once iteration ends, `completions` holds the finished `Completion`s. Iteration
    raises the job's error (ValueError, ServiceStopped) instead, before yielding anything."""

    def __init__(self, service: LockstepService, job: _Job) -> None:
        self._service, self._job = service, job
        self.completions: list[Completion] | None = None

    def __iter__(self) -> Iterator[list[StepEvent]]:
        job = self._job
        while True:
            try:
                events = job.events.get(timeout=0.5)
            except queue.Empty:
                if self._service.closed and not job.done.is_set():
                    raise ServiceStopped("server is shutting down") from None
                continue
            if events is None:
                break
            yield events
        if job.error is not None:
            raise job.error
        self.completions = job.result


class LockstepService:
    """See the module docstring. `engine` is this rank's `RolloutEngine`."""

    def __init__(self, engine, poll_s: float = 0.05, heartbeat_s: float = 1.0) -> None:
        self.engine = engine
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.stop_requested = False
        self.closed = False
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._world = dist.get_world_size() if dist.is_initialized() else 1
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        self.batches = 0
        self.jobs = 0
        """Jobs queued (rank 0; `kat serve`'s /stats)."""
        self.sequences = 0

    @property
    def leader(self) -> bool:
        return self._rank == 0

    def request_stop(self, *_: object) -> None:
        """Ask for a clean shutdown (also usable as a signal handler)."""
        self.stop_requested = True

    def submit(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]):
        """Rank 0, any thread: run `generate(prompts, params, seeds=seeds)`; blocks for it."""
        job = self._enqueue(_Job(prompts, params, seeds))
        while not job.done.wait(0.5):
            if self.closed:  # queued after rank 0's last look at the queue
                raise ServiceStopped("server is shutting down")
        if job.error is not None:
            raise job.error
        return job.result

    def stream(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> Stream:
        """Rank 0, any thread: queue the same work as `submit` and return at once; iterate the
        `Stream` for its tokens step by step (see the module docstring)."""
        return Stream(self, self._enqueue(_Job(prompts, params, seeds, events=queue.Queue())))

    def _enqueue(self, job: _Job) -> _Job:
        if self.stop_requested:
            raise ServiceStopped("server is shutting down")
        self.jobs += 1
        self._queue.put(job)
        return job

    def run(self) -> None:
        """Every rank: serve until a stop (rank 0 decides it; the others follow)."""
        if self.leader:
            try:
                self._lead()
            finally:
                self.closed = True
                self._fail_queued()
        else:
            self._follow()
            self.closed = True

    # --------------------------------------------------------------------------- internals
    def _take(self) -> list[_Job]:
        jobs = []
        try:
            jobs.append(self._queue.get(timeout=self.poll_s))
            while True:
                jobs.append(self._queue.get_nowait())
        except queue.Empty:
            return jobs

    def _broadcast(self, message: tuple) -> tuple:
        if self._world > 1:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        return message

    def _lead(self) -> None:
        last = time.monotonic()
        while True:
            jobs = [] if self.stop_requested else self._take()
            if self.stop_requested:
                for job in jobs:
                    job.finish(error=ServiceStopped("server is shutting down"))
                self._broadcast(("stop", []))
                return
            if not jobs and time.monotonic() - last < self.heartbeat_s:
                continue
            jobs = [job for job in jobs if self._accept(job)]
            batch = [(
                [p for j in jobs for p in j.prompts],
                [j.params for j in jobs for _ in j.prompts],
                [s for j in jobs for s in j.seeds],
            )] if jobs else []  # fmt: skip
            self._broadcast(("work", batch))
            last = time.monotonic()
            for prompts, params, seeds in batch:
                self._run_group(jobs, prompts, params, seeds)

    def _accept(self, job: _Job) -> bool:
        """Check a job before it joins a batch (local): a bad one fails alone."""
        try:
            self.engine.check_prompts(job.prompts)
            if len(job.seeds) != len(job.prompts):
                raise ValueError(f"seeds: expected {len(job.prompts)} values")
        except ValueError as err:
            job.finish(error=err)
            return False
        return True

    def _run_group(self, jobs: list[_Job], prompts, params, seeds) -> None:
        try:
            out = self.engine.generate(prompts, params, seeds=seeds, on_step=_on_step(jobs))
        except Exception as err:  # noqa: BLE001 - a batch fails, the service goes on
            # ValueError is raised before any collective, identically on every rank; anything
            # else is a bug, reported to the batch's clients (500) and logged.
            if not isinstance(err, ValueError):
                log.exception("kat serve: a batch failed; its requests get an error")
            for job in jobs:
                job.finish(error=err)
            return
        self.batches += 1
        self.sequences += len(prompts)
        at = 0
        for job in jobs:
            job.finish(result=out[at : at + len(job.prompts)])
            at += len(job.prompts)

    def _follow(self) -> None:
        while True:
            kind, batch = self._broadcast((None, None))
            if kind == "stop":
                return
            for prompts, params, seeds in batch:
                try:
                    self.engine.generate(prompts, params, seeds=seeds)
                except Exception:  # noqa: BLE001 - rank 0 got the same error and reports it
                    log.debug("kat serve: batch failed on this rank", exc_info=True)
                self.batches += 1

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            job.finish(error=ServiceStopped("server is shutting down"))


def _on_step(jobs: list[_Job]):
    """The engine callback of one merged `generate` call: each streamed job's events, re-indexed
    to its own prompts, onto its queue; None when no job streams. Never raises: an exception
    here would leave rank 0's decode loop while the other ranks' continue."""
    owners = [(job, i) for job in jobs for i in range(len(job.prompts))]
    if not any(job.events is not None for job in jobs):
        return None

    def on_step(events: list[StepEvent]) -> None:
        try:
            per_job: dict[int, list[StepEvent]] = {}
            for index, token, logprob, finish in events:
                job, local = owners[index]
                if job.events is not None:
                    per_job.setdefault(id(job), []).append((local, token, logprob, finish))
            for job in jobs:
                if id(job) in per_job:
                    job.events.put(per_job[id(job)])
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("kat serve: streaming callback failed; the batch carries on")

    return on_step
