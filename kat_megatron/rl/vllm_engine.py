"""vLLM as stage rl's rollout engine (`rl.rollout.engine: vllm`, docs/rollout_engine.md).

`VllmRolloutEngine(model, tokenizer, model_config, rollout, ...)` has the `RolloutEngine`
interface the collector uses (`generate(prompts, params, seeds=)`, `refit()`). The first rank of
each model-parallel group (every data-parallel replica has its own) starts one long-lived
worker, `.venv-vllm/bin/python -P kat_megatron/rl/vllm_worker.py` (`rl.rollout.vllm_python`,
else env `KAT_VLLM_PYTHON`, else `<repo>/.venv-vllm/bin/python`), and talks to it over a
`multiprocessing.connection` Unix socket (pickled dicts of ids and floats, never tensors):
- start: a folder with only `config.json` (the HF config `kat convert mcore-to-hf` writes) is
  loaded with `load_format="dummy"`; the first `generate` sends the policy as a refit does (the
  trainer loads its checkpoint after building the engine): no weights touch the disk;
- `generate`: token-id prompts, per-request seeds and the same `SamplingParams` fields as the
  megatron engine (temperature, top_p, top_k, max_new_tokens, stop_token_ids; stop strings are
  refused by `check_rollout`); vLLM returns the sampled ids and their log-probs, which the first
  model-parallel rank broadcasts to its group (TP x PP ranks);
- `refit()`, after every optimizer step: the policy is gathered one parameter at a time into HF
  names and full tensors (`inference.weight_sync.iter_hf_tensors`, the exporter's mapping; a
  collective over TP) and packed into a `multiprocessing.shared_memory` segment of
  `rl.rollout.refit_bucket_mb` MiB; each full segment is loaded by the worker (vLLM's layerwise
  reload and the model's `load_weights`) before the next is packed, so one bucket plus one
  parameter is the most of the model alive outside the trainer at once. A tensor larger than the
  bucket gets a segment of its own size.
Supported: training at any TP, PP and EP (at EP > 1 every replica takes part in the gather,
expert-parallel groups span them; at PP > 1 the stages take turns sending their layers to the
owner, `weight_sync.is_refit_owner`: tensor and pipeline rank 0, which also leads the
model-parallel group the rollouts are broadcast over), vLLM at its own `rl.rollout.tp`. vLLM's
CPU MoE kernels need their prepack redone on a reload (`vllm_worker._forget_cpu_moe_kernels`).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing import shared_memory
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import torch
from megatron.core.utils import unwrap_model

from kat_megatron.checkpoint.hf_config import hf_config_for, hf_spec_for
from kat_megatron.config.schema import ModelConfig
from kat_megatron.inference.sampling import request_seed
from kat_megatron.inference.types import Completion, SamplingParams
from kat_megatron.inference.weight_sync import is_refit_owner, iter_hf_tensors
from kat_megatron.rl.rollout_config import RolloutConfig, resolve_vllm_python
from kat_megatron.rl.rollouts import broadcast_mp, is_mp_src
from kat_megatron.rl.vllm_replicas import ReplicaPlan, split

log = logging.getLogger("kat")

WORKER = Path(__file__).with_name("vllm_worker.py")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VllmWorker:
    """The worker process and its connection (on the rank that owns it)."""

    def __init__(self, python: Path, log_path: Path, timeout_s: float) -> None:
        self._dir = tempfile.mkdtemp(prefix="kat-vllm-")
        address = os.path.join(self._dir, "socket")
        key = secrets.token_hex(16)
        self._listener = Listener(address, family="AF_UNIX", authkey=key.encode())
        env = dict(os.environ, KAT_VLLM_AUTHKEY=key)
        env.pop("PYTHONPATH", None)  # the worker must not see kat's virtual environment
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [str(python), "-P", str(WORKER), address], env=env, stdout=self._log, stderr=self._log
        )
        atexit.register(self._kill)  # never leave the worker behind a crashed trainer
        self.conn = self._accept(timeout_s)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _accept(self, timeout_s: float):
        box: list = []
        thread = threading.Thread(target=lambda: box.append(self._listener.accept()), daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while thread.is_alive() and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM worker exited ({self.proc.returncode}): {self.tail()}")
            thread.join(0.2)
        if not box:
            self.proc.kill()
            raise RuntimeError(f"vLLM worker did not connect in {timeout_s:.0f} s: {self.tail()}")
        return box[0]

    def tail(self, n: int = 3000) -> str:
        """The end of the worker's log (its stdout and stderr)."""
        self._log.flush()
        text = self.log_path.read_bytes()[-n:].decode(errors="replace")
        return f"{self.log_path}: ...{text}"

    def call(self, op: str, **kwargs: Any) -> dict:
        """Send one request and wait for its answer; the worker's errors raise here."""
        self.send(op, **kwargs)
        return self.recv(op)

    def send(self, op: str, **kwargs: Any) -> None:
        """Send one request (`recv` its answer: several workers can work at once)."""
        try:
            self.conn.send({"op": op, **kwargs})
        except (EOFError, OSError) as err:
            raise RuntimeError(f"vLLM worker gone during {op!r} ({err}): {self.tail()}") from None

    def recv(self, op: str) -> dict:
        """The answer to the request `op` sent last; the worker's errors raise here."""
        try:
            reply = self.conn.recv()
        except (EOFError, OSError) as err:
            raise RuntimeError(f"vLLM worker gone during {op!r} ({err}): {self.tail()}") from None
        if not reply.get("ok"):
            raise RuntimeError(f"vLLM worker failed in {op!r}:\n{reply.get('error')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("shutdown")
                self.proc.wait(timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        atexit.unregister(self._kill)
        self.conn.close()
        self._listener.close()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def call_all(workers: list[VllmWorker], op: str, **kwargs: Any) -> list[dict]:
    """`op` on every worker at once (all sent, then all answers)."""
    for w in workers:
        w.send(op, **kwargs)
    return [w.recv(op) for w in workers]


class _Buckets:
    """Packs (name, tensor) pairs into a shared-memory segment and sends each full one to every
    worker of this owner (they read the same segment)."""

    def __init__(self, workers: list[VllmWorker], capacity: int) -> None:
        self.workers = workers
        self.capacity = capacity
        self.shm: shared_memory.SharedMemory | None = None
        self.entries: list[tuple] = []
        self.used = 0
        self.sent_bytes = 0
        self.buckets = 0

    def _segment(self, size: int) -> shared_memory.SharedMemory:
        if self.shm is None or self.shm.size < size:
            self.release()
            self.shm = shared_memory.SharedMemory(create=True, size=size)
        return self.shm

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if self.used + nbytes > self.capacity and self.entries:
            self.flush()
        shm = self._segment(max(self.capacity, nbytes))
        view = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes, offset=self.used)
        view.copy_(t.view(-1).view(torch.uint8))
        del view
        self.entries.append((name, _DTYPE_NAMES[t.dtype], list(t.shape), self.used, nbytes))
        self.used += nbytes
        if self.used >= self.capacity:
            self.flush()

    def flush(self) -> None:
        if not self.entries:
            return
        call_all(self.workers, "refit_bucket", shm=self.shm.name, tensors=self.entries)
        self.sent_bytes += self.used
        self.buckets += 1
        self.entries, self.used = [], 0

    def release(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


class VllmRolloutEngine:
    """Rollouts from a vLLM worker holding the current policy (see the module doc)."""

    def __init__(
        self,
        model,
        tokenizer,
        model_config: ModelConfig,
        rollout: RolloutConfig,
        *,
        max_sequence_length: int,
        params_dtype: torch.dtype,
        seed: int = 0,
        log_dir: str | Path = ".",
    ) -> None:
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.model = unwrap_model(chunks)
        """This rank's model chunks (one per virtual pipeline stage)."""
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.rollout = rollout
        self.max_sequence_length = max_sequence_length
        self.params_dtype = params_dtype
        self.seed = seed
        self.weights_version = 0
        self.stats = {"calls": 0, "sequences": 0, "generated_tokens": 0, "seconds": 0.0,
                      "refits": 0, "refit_seconds": 0.0, "refit_bytes": 0,
                      "refit_buckets": 0}  # fmt: skip
        if is_refit_owner() != is_mp_src():  # the refit's owner generates and broadcasts
            raise RuntimeError(
                "VllmRolloutEngine: the refit owner must lead its model-parallel group"
            )
        self.plan = ReplicaPlan.build(rollout.replicas, is_mp_src())
        self.owner = self.plan.owner
        """This rank starts and feeds `plan.per_owner` workers."""
        self.workers: list[VllmWorker] = []
        self._config_dir: str | None = None
        if self.owner:
            self._start(Path(log_dir))
        self._loaded = False
        """Whether the worker holds the current weights: the first `generate` sends them (the
        trainer loads its checkpoint after building the engine; the worker starts dummy)."""

    def _start(self, log_dir: Path) -> None:
        python = resolve_vllm_python(self.rollout.vllm_python)
        self._config_dir = tempfile.mkdtemp(prefix="kat-vllm-config-")
        spec = hf_spec_for(self.model_config)
        ids = {
            k: v
            for k, v in (
                ("bos_token_id", self.tokenizer.bos_token_id),
                ("eos_token_id", self.tokenizer.eos_token_id),
                ("pad_token_id", self.tokenizer.pad_token_id),
            )
            if v is not None
        }
        hf_config_for(self.model_config, spec, self.params_dtype, ids).save_pretrained(
            self._config_dir
        )
        start = time.perf_counter()
        first = self.plan.first_index
        paths = [log_dir / f"vllm_worker_{first + j}.log" for j in range(self.plan.per_owner)]
        for path in paths:  # connected in turn; their vLLM start-ups (init) run at once
            self.workers.append(VllmWorker(python, path, self.rollout.startup_timeout_s))
        replies = call_all(
            self.workers,
            "init",
            model_dir=self._config_dir,
            dtype=_DTYPE_NAMES[self.params_dtype],
            max_model_len=self.max_sequence_length,
            seed=self.seed,
            tp=self.rollout.tp,
            llm_kwargs=dict(self.rollout.vllm_args),
        )
        log.info(
            "vLLM %s rollout worker(s) %s up in %.1f s (log %s)",
            replies[0]["version"],
            ", ".join(str(first + j) for j in range(len(paths))),
            time.perf_counter() - start,
            ", ".join(map(str, paths)),
        )

    # ----------------------------------------------------------------------------- generate
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        *,
        seeds: list[int] | None = None,
    ) -> list[Completion]:
        """Completions of `prompts` (token ids), in order; collective over the model-parallel
        group. Seeds as `RolloutEngine.generate`: `seeds[i]`, else `request_seed(params.seed,
        i)`, else from the engine's seed and call counter."""
        rows = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(rows) != len(prompts):
            raise ValueError(f"params: expected one SamplingParams or {len(prompts)} of them")
        if seeds is None:
            base = rows[0].seed if rows else None
            if base is None:
                base = request_seed(self.seed, -1 - self.stats["calls"])
            seeds = [request_seed(base, i) for i in range(len(prompts))]
        if not self._loaded:
            self._push()
        self.stats["calls"] += 1
        start = time.perf_counter()
        outputs = None
        for i, p in enumerate(prompts):  # on every rank: none waits for a failed owner
            if len(p) >= self.max_sequence_length:
                raise ValueError(
                    f"prompts[{i}]: {len(p)} tokens leave no room to generate within "
                    f"max_sequence_length={self.max_sequence_length}"
                )
        if self.plan.source and (prompts or self.plan.group is not None):
            specs = [
                {
                    "temperature": r.temperature,
                    "top_p": r.top_p,
                    "top_k": r.top_k,
                    "max_tokens": min(r.max_new_tokens, self.max_sequence_length - len(p)),
                    "stop_token_ids": list(r.stop_token_ids),
                    "seed": int(s),
                }
                for r, p, s in zip(rows, prompts, seeds)
            ]
            parts = self.plan.gather([(list(p), sp) for p, sp in zip(prompts, specs)])
            if self.owner:  # this block's requests, in source order
                done = iter(self._run([r for part in parts for r in part]))
                parts = [[next(done) for _ in part] for part in parts]
            outputs = self.plan.scatter(parts)
        outputs = broadcast_mp(outputs) if prompts else []
        out = [
            Completion(
                prompt_ids=list(p),
                token_ids=o["token_ids"],
                logprobs=o["logprobs"],
                text=self.tokenizer.decode(o["token_ids"], skip_special_tokens=False),
                finish_reason="length" if o["finish_reason"] == "length" else "stop",
            )
            for p, o in zip(prompts, outputs)
        ]
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["sequences"] += len(out)
        self.stats["generated_tokens"] += sum(len(c.token_ids) for c in out)
        return out

    def _run(self, requests: list[tuple]) -> list[dict]:
        """Outputs of (prompt ids, sampling spec) `requests` from this owner's workers, each
        taking a contiguous share."""
        shares = split(requests, len(self.workers))
        busy = [(w, part) for w, part in zip(self.workers, shares) if part]
        for w, part in busy:
            w.send("generate", prompts=[p for p, _ in part], params=[sp for _, sp in part])
        return [o for w, _ in busy for o in w.recv("generate")["outputs"]]

    # ----------------------------------------------------------------------------- refit
    def refit(self) -> None:
        """Send the current policy to the worker (collective over the model-parallel and
        expert-parallel groups; see the module doc). Call after every optimizer step."""
        self.weights_version += 1
        self._push()

    @torch.no_grad()
    def _push(self) -> None:
        start = time.perf_counter()
        buckets = None
        if self.owner:
            call_all(self.workers, "refit_begin")
            buckets = _Buckets(self.workers, int(self.rollout.refit_bucket_mb * 2**20))
        try:
            for name, tensor in iter_hf_tensors(self.model, self.model_config):
                if buckets is not None:
                    buckets.add(name, tensor.to(self.params_dtype))
            if buckets is not None:
                buckets.flush()
                call_all(self.workers, "refit_end")
        finally:
            if buckets is not None:
                buckets.release()
        self._loaded = True
        self.stats["refits"] += 1
        self.stats["refit_seconds"] += time.perf_counter() - start
        if buckets is not None:
            self.stats["refit_bytes"] = buckets.sent_bytes
            self.stats["refit_buckets"] = buckets.buckets
            log.info(
                "vLLM refit %d: %.1f MB in %d bucket(s), %.2f s",
                self.weights_version,
                buckets.sent_bytes / 1e6,
                buckets.buckets,
                time.perf_counter() - start,
            )

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        while self.workers:
            self.workers.pop().close()
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None
