"""Exact resume and crash-safe saving: `pytest tests/training/test_resume.py`.

Two gloo ranks (DP=2, distributed optimizer sharding Adam state over both):
- 10 steps straight vs 5 steps, exit with a checkpoint, resume, 5 steps: identical per-step losses
  and identical final weights and optimizer state, bitwise (CPU fp32 is deterministic for a fixed
  layout, so anything but equality means lost or wrong state: RNG, scheduler, data position).
- Logging sinks: TensorBoard event files are written, and the resumed run continues the same
  (offline) wandb run id.
- A crash injected mid-save of step 10 (after the shards are written, before the checkpoint is
  marked complete) leaves `--resume auto` on step 5, and the resumed run ends bitwise equal too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kat_megatron.training.checkpoint_meta import checkpoint_dir, latest_checkpoint
from kat_megatron.training.checkpointing import read_checkpoint_tensors

pytestmark = pytest.mark.timeout(1200)  # several multi-rank trainings per test


def write_config(root: Path, corpus: Path) -> Path:
    cfg = {
        "model": {"preset": "tiny-dense"},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2},
        "training": {"steps": 10, "micro_batch_size": 2, "global_batch_size": 4},
        "data": {"paths": [str(corpus)], "seq_length": 32, "cache_dir": str(root / "cache")},
        "checkpoint": {"save_interval": 5},
        "logging": {"tensorboard": True, "wandb": True},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_corpus, kat, metrics):
    root = tmp_path_factory.mktemp("resume")
    config = write_config(root, tiny_corpus)
    run = root / "straight"
    kat(["train", str(config), f"run.dir={run}"], nproc=2)
    return config, run, metrics(run)


def assert_same_state(a: Path, b: Path) -> None:
    ta, tb = read_checkpoint_tensors(a), read_checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    model_keys = [k for k in ta if k.startswith("decoder.") or k.startswith("embedding.")]
    optim_keys = [k for k in ta if k.startswith("optimizer.")]
    assert model_keys and optim_keys, sorted(ta)[:10]
    for key in ta:
        assert ta[key].equal(tb[key]), key


def test_resume_is_bitwise_exact(straight, kat, metrics):
    config, run, rows = straight
    split = run.parent / "split"
    kat(["train", str(config), f"run.dir={split}", "training.exit_interval=5"], nproc=2)
    assert latest_checkpoint(split / "checkpoints") == checkpoint_dir(split / "checkpoints", 5)
    assert [r["step"] for r in metrics(split)] == [1, 2, 3, 4, 5]
    proc = kat(["train", str(config), f"run.dir={split}"], nproc=2)
    assert "resumed from" in proc.stderr
    resumed = metrics(split)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in rows]
    assert_same_state(
        latest_checkpoint(run / "checkpoints"), latest_checkpoint(split / "checkpoints")
    )
    # logging sinks: TensorBoard events, and one offline wandb run id across the resume
    assert list((split / "tensorboard").glob("events.out.tfevents.*"))
    run_id = (split / "wandb_id.txt").read_text().strip()
    offline = sorted((split / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)


def test_crash_mid_save_keeps_previous_checkpoint(straight, kat, metrics):
    config, run, rows = straight
    crash = run.parent / "crash"
    proc = kat(
        ["train", str(config), f"run.dir={crash}"],
        nproc=2,
        env={"KAT_FAULT_INJECT": "after_shards:10"},
        check=False,
    )
    assert proc.returncode != 0
    ckpts = crash / "checkpoints"
    assert (ckpts / "iter_0000010.tmp").is_dir()  # shards were written...
    assert latest_checkpoint(ckpts) == checkpoint_dir(ckpts, 5)  # ...but never marked complete
    proc = kat(["train", str(config), f"run.dir={crash}"], nproc=2)
    assert "resumed from" in proc.stderr and "iter_0000005" in proc.stderr
    assert [r["loss"] for r in metrics(crash)] == [r["loss"] for r in rows]
    assert latest_checkpoint(ckpts) == checkpoint_dir(ckpts, 10)
    assert not (ckpts / "iter_0000010.tmp").exists()
    assert_same_state(latest_checkpoint(run / "checkpoints"), latest_checkpoint(ckpts))
