"""RL trainer parts without ranks: prompt records, the prompt sampler, rollout rows, metrics,
and the `rl:` config section (`pytest tests/rl/test_trainer_units.py`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kat_megatron.rl.batching import RolloutSample, collate_rollouts, microbatches
from kat_megatron.rl.prompts import PromptSampler, load_prompts
from kat_megatron.rl.step_metrics import rollout_metrics


def _record(i: int, **over) -> dict:
    rec = {
        "id": f"p{i}",
        "messages": [{"role": "user", "content": f"What is {i} + 1?"}],
        "reference": str(i + 1),
        "verifier": "exact_match",
        "category": "easy",
    }
    rec.update(over)
    return rec


def _write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_prompts_jsonl_and_dataset_dir(tmp_path):
    import datasets

    recs = [_record(i) for i in range(3)] + [_record(3, category=None, extra=7)]
    del recs[3]["id"]
    got = load_prompts(_write(tmp_path / "p.jsonl", recs))
    assert [p.id for p in got] == ["p0", "p1", "p2", "3"]  # id defaults to the record index
    assert got[3].category == "all" and got[3].meta["extra"] == 7
    assert got[0].meta["reference"] == "1" and got[0].meta["verifier"] == "exact_match"
    datasets.Dataset.from_list(recs[:3]).save_to_disk(str(tmp_path / "ds"))
    assert [p.id for p in load_prompts(tmp_path / "ds")] == ["p0", "p1", "p2"]


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("{not json", "p.jsonl:2: invalid JSON"),
        (_record(1, reference=None), "p.jsonl:2: record 1: field 'reference' is missing"),
        (_record(1, verifier="nope"), "p.jsonl:2: record 1: field 'verifier'='nope': expected one"),
        (_record(1, messages=[{"role": "user"}]), "p.jsonl:2: record 1: field 'messages'"),
        (
            _record(1, messages=[{"role": "assistant", "content": "x"}]),
            "field 'messages': the last message must be a user turn",
        ),
    ],
)
def test_malformed_prompt_records_name_line_and_field(tmp_path, bad, expected):
    path = _write(tmp_path / "p.jsonl", [_record(0), bad])
    with pytest.raises(ValueError) as info:
        load_prompts(path)
    assert expected in str(info.value)


def test_malformed_dataset_record_names_index(tmp_path):
    import datasets

    rows = [_record(0), _record(1, verifier="nope")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"ds: record 1: field 'verifier'='nope'"):
        load_prompts(tmp_path / "ds")


def test_sampler_epochs_are_permutations_and_resume_continues():
    a = PromptSampler(5, seed=3)
    seq = a.take(7) + a.take(8)
    assert sorted(seq[:5]) == list(range(5)) and sorted(seq[5:10]) == list(range(5))
    assert seq[:5] != seq[5:10]  # a new permutation each epoch (seeded by seed + epoch)
    b = PromptSampler(5, seed=3, position=9)
    assert b.take(6) == seq[9:15]  # the whole state is the position
    assert PromptSampler(4, seed=1, shuffle=False).take(6) == [0, 1, 2, 3, 0, 1]


def test_collate_places_response_values_after_the_prompt():
    s = RolloutSample([5, 6, 7], [8, 9], [0.5, -1.0], [-0.1, -0.2], ref_logprobs=[-0.3, -0.4])
    short = RolloutSample([1], [2], [2.0], [-0.5], ref_logprobs=[-0.6])
    b = collate_rollouts([s, short, None], pad_id=0, pad_multiple=8, with_ref=True)
    assert b["tokens"].shape == (3, 8)
    # ids = 5 6 7 8 9: tokens ids[:-1], labels ids[1:]; the response labels 8, 9 sit at 2 and 3
    assert b["tokens"][0, :4].tolist() == [5, 6, 7, 8] and b["labels"][0, :4].tolist() == [
        6,
        7,
        8,
        9,
    ]
    assert b["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert b["advantages"][0, 2:4].tolist() == [0.5, -1.0]
    assert torch.allclose(b["rollout_logprobs"][0, 2:4], torch.tensor([-0.1, -0.2]))
    assert torch.allclose(b["ref_logprobs"][1, :1], torch.tensor([-0.6]))
    assert b["labels"][1, 0] == 2 and b["loss_mask"][1].sum() == 1
    assert b["loss_mask"][2].sum() == 0 and b["position_ids"][2].tolist() == list(range(8))
    assert "old_logprobs" not in b  # only with rl.ppo_epochs / rl.mini_batches > 1
    s.old_logprobs, short.old_logprobs = [-0.7, -0.8], [-0.9]
    b = collate_rollouts([s, short, None], pad_id=0, pad_multiple=8, with_old=True)
    assert torch.allclose(b["old_logprobs"][0, 2:4], torch.tensor([-0.7, -0.8]))
    assert torch.allclose(b["old_logprobs"][1, :1], torch.tensor([-0.9]))
    short.old_logprobs = None
    with pytest.raises(ValueError, match="a sample lacks old_logprobs"):
        collate_rollouts([s, short], pad_id=0, pad_multiple=8, with_old=True)


def test_microbatches_pad_to_the_common_count():
    rows = [RolloutSample([1, 2], [3], [1.0], [0.0]) for _ in range(3)]
    out = microbatches(rows, mbs=2, n_micro=3, pad_id=0, pad_multiple=16)
    assert [b["tokens"].shape for b in out] == [(2, 16)] * 3
    assert [b["loss_mask"].sum().item() for b in out] == [2, 1, 0]
    with pytest.raises(ValueError, match="do not fit"):
        microbatches(rows, mbs=1, n_micro=2, pad_id=0, pad_multiple=16)


def test_rollout_metrics_by_mode_and_category():
    def row(cat, mode, correct, tokens, r_mode):
        return {"category": cat, "mode": mode, "correct": correct, "format_ok": 1.0,
                "answer_reward": correct + 0.2, "components": {"correctness": correct},
                "r_mode": r_mode, "tokens": tokens, "truncated": False}  # fmt: skip

    rows = [
        row("easy", "think_off", 1.0, 10, 1.0),
        row("easy", "think_on", 1.0, 30, -1.0),
        row("hard", "think_on", 0.0, 40, 0.0),
        row("hard", None, 0.0, 64, 0.0),
    ]
    m = rollout_metrics(rows, mode_weight=0.5)
    assert m["acc"] == 0.5 and m["acc/think_on"] == 0.5 and m["acc/think_off"] == 1.0
    assert m["think_on_rate"] == 0.5 and m["think_on_rate/easy"] == 0.5
    assert m["think_on_rate/hard"] == 0.5 and m["no_mode_rate"] == 0.25
    assert m["response_tokens/think_on"] == 35.0 and m["response_tokens"] == 36.0
    # total = mean(answer + 0.5 * r_mode) = mean(1.7, 0.7, 0.2, 0.2)
    assert m["reward/total"] == pytest.approx(0.7) and m["reward/mode"] == 0.0
    assert m["acc/easy"] == 1.0 and m["reward/correctness"] == 0.5
    assert rollout_metrics([], 1.0) == {}


def test_rl_config_section(tmp_path):
    from kat_megatron.config import load_config
    from kat_megatron.rl.parts import build_parts
    from kat_megatron.stages import load_run_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "stage: rl\nrl:\n  prompts: p.jsonl\n  sampling: {max_new_tokens: 32}\n"
        "  advantages: {estimator: grpo}\n"
    )
    cfg = load_config(path, ["rl.policy_loss.clip_high=0.3", "rl.rewards.overlong_buffer=8"])
    parts = build_parts(cfg.rl)
    from kat_megatron.config.schema import RL_SUBSECTIONS

    assert tuple(f.name for f in dataclasses.fields(parts)) == RL_SUBSECTIONS  # one set of names
    assert parts.policy_loss.clip_high == 0.3 and parts.advantages.estimator == "grpo"
    assert parts.rewards.max_new_tokens == 32  # follows the sampling budget
    assert parts.rewards.overlong_buffer == 8 and parts.sampling.max_new_tokens == 32
    cases = {
        "rl.policy_loss.clip_hi=0.3": "rl.policy_loss: unknown keys ['clip_hi']",
        "rl.advantages.estimator=ppo": "rl.advantages.estimator='ppo': unknown",
        "rl.rewards.overlong_buffer=40": "rl.rewards.overlong_buffer=40",
        "rl.group_size=1": "rl.group_size=1: expected >= 2",
        "rl.ppo_epochs=0": "rl.ppo_epochs",
        "rl.mini_batches=0": "rl.mini_batches",
        "parallel.pp=2": "stage rl: parallel.pp=2 needs rl.rollout.engine=vllm",
        "rl.sampling.max_new_tokens=600": "rl.sampling.max_new_tokens=600 leaves no room",
        "rl.router_replay=true": "rl.router_replay: the policy has no MoE layers",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError, match=None) as info:
            load_run_config(path, [override])
        assert message in str(info.value), (override, str(info.value))
    vpp = ["parallel.pp=2", "parallel.vpp=2", "rl.rollout.engine=vllm"]
    with pytest.raises(ValueError, match=r"stage rl: parallel.vpp \(interleaved pipeline"):
        load_run_config(path, vpp)
    with pytest.raises(ValueError, match="set rl.prompts"):
        load_run_config(None, ["stage=rl"])
    moe = ["rl.router_replay=true", "model.preset=tiny-qwen3-moe"]
    for extra, message in (
        (["rl.rollout.engine=vllm"], "rl.router_replay needs rl.rollout.engine=megatron"),
        (["parallel.tp=2", "parallel.ep=2"], "rl.router_replay needs parallel.tp=1"),
    ):
        with pytest.raises(ValueError, match=message):
            load_run_config(path, moe + extra)
