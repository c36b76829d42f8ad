"""TP worker for tests/inference/test_engine.py (real gloo ranks):

    python -m torch.distributed.run --nproc-per-node 2 tests/inference/engine_worker.py CKPT OUT_DIR

Builds the model as the trainer does (TP = world size, sequence parallelism on), loads CKPT,
wraps the live model in a `RolloutEngine` (colocated) and saves to OUT_DIR/rank{R}.pt: greedy
and seeded-sampled completions of `PROMPTS`, the trainer-style recomputed log-probs of the greedy
completions, the same after an in-place weight update (the engine must see it), whether sequence
parallelism was restored and a training backward ran after generation; rank 0 also saves the
Hugging Face-named gathered weights (`engine_sync.hf_state_dict`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

PROMPTS = [
    "We know that 12 plus 7 equals",
    "The big horse",
    "The old teacher watches the river. The slow farmer",
    "18 - 9 =",
    "The",
]
MAX_NEW = 24
SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=16, seed=11)


def train_checkpoint(root: Path, steps: int) -> Path:
    """`kat train` the tiny pretraining recipe at TP=1 for `steps` steps; its checkpoint dir."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "kat_tests_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
    )
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    run_kat = conftest.run_kat

    run = root / "run"
    run_kat(["train", "examples/tiny_pretrain/config.yaml", "parallel.tp=1",
             f"training.steps={steps}", "optimizer.lr=3e-3", "checkpoint.save_interval=0",
             "logging.tensorboard=false", f"run.dir={run}"], nproc=1)  # fmt: skip
    return run / "checkpoints"


def start_server(args: list[str], d: Path, timeout: float = 240):
    """`kat serve ARGS --port 0 --ready-file d/ready.txt` as a subprocess (logs d/out.log,
    d/err.log); returns (process, base URL) once the ready file exists, or fails the test with
    the server's stderr. The caller terminates the process."""
    import subprocess
    import time

    import pytest

    ready = d / "ready.txt"
    cmd = [sys.executable, "-m", "kat_megatron.cli", "serve", *args, "--port", "0",
           "--ready-file", str(ready)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    repo = Path(__file__).resolve().parents[2]
    with open(d / "out.log", "w") as out, open(d / "err.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=err)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"kat serve did not start:\n{(d / 'err.log').read_text()[-3000:]}")
        time.sleep(0.3)
    return proc, ready.read_text().strip()


def recomputed_logprobs(model, completion, tp: int = 1) -> torch.Tensor:
    """log p(token_ids) from one full forward of prompt + completion through Megatron-Core's
    forward-only schedule (no inference context, no KV cache): what the trainer computes."""
    from kat_megatron.models.forward import forward_logits

    seq = completion.prompt_ids + completion.token_ids
    padded = seq + [0] * (-len(seq) % tp)  # sequence parallelism splits the sequence over TP
    logits = forward_logits([model], torch.tensor([padded]))[0, : len(seq)]
    n = len(completion.prompt_ids)
    logp = torch.log_softmax(logits.float(), dim=-1)[n - 1 : len(seq) - 1]
    return logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]


def _training_backward(model, tp: int) -> bool:
    """One forward-backward with labels (the trainer's path); True when grads are finite."""
    tokens = torch.arange(2 * 8 * tp).reshape(2, 8 * tp) % 300 + 5
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, pos, None, labels=tokens).float().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    ok = bool(grads) and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    return ok


def main(ckpt: str, out: str) -> None:
    import torch.distributed as dist

    from kat_megatron.config.schema import ParallelConfig
    from kat_megatron.data.tokenizer import load_tokenizer
    from kat_megatron.inference.engine import RolloutEngine
    from kat_megatron.inference.loading import read_checkpoint_config
    from kat_megatron.inference.types import SamplingParams
    from kat_megatron.inference.weight_sync import hf_state_dict
    from kat_megatron.models.builder import build_model, transformer_config
    from kat_megatron.parallel.init import initialize, shutdown
    from kat_megatron.training.checkpointing import load_checkpoint

    path, cfg = read_checkpoint_config(ckpt)
    tp = int(os.environ["WORLD_SIZE"])
    parallel = ParallelConfig(tp=tp)  # sequence parallelism on at tp > 1, as in training
    initialize(parallel, 1234, cfg.model)
    rank = dist.get_rank()
    tcfg = transformer_config(cfg.model, parallel, "fp32", calculate_per_token_loss=True)
    model = build_model(cfg.model, parallel, "fp32", config=tcfg)[0]
    load_checkpoint(path, [model])
    tok = load_tokenizer(cfg.data.tokenizer)
    engine = RolloutEngine(model, tok, max_sequence_length=128, max_batch_size=3)
    res: dict = {"sp_before": model.config.sequence_parallel}

    greedy = engine.generate_text(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW))
    res["sp_after"] = model.config.sequence_parallel
    res["training_after"] = model.training
    res["greedy"] = [(c.token_ids, c.logprobs, c.finish_reason) for c in greedy]
    res["recomputed"] = [recomputed_logprobs(model, c, tp).tolist() for c in greedy]
    sampled = engine.generate_text(PROMPTS, SamplingParams(**SAMPLED))
    res["sampled"] = [c.token_ids for c in sampled]
    res["backward_ok"] = _training_backward(model, tp)
    if rank == 0:
        torch.save(hf_state_dict(model, cfg.model), Path(out) / "hf_state.pt")
    else:
        hf_state_dict(model, cfg.model)  # collective: every TP rank takes part

    with torch.no_grad():  # an "optimizer step" in place: the engine must use the new weights
        for p in model.parameters():
            p.mul_(1.05)
    engine.refit()
    after = engine.generate(
        [c.prompt_ids for c in greedy[:2]], SamplingParams(temperature=0, max_new_tokens=8)
    )
    res["after_update"] = [c.logprobs for c in after]
    res["after_update_recomputed"] = [recomputed_logprobs(model, c, tp).tolist() for c in after]
    torch.save(res, Path(out) / f"rank{rank}.pt")
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
