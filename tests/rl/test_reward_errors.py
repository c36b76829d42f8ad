"""Reward errors (issue 17): a verifier's internal failure is carried on the score, its group is
dropped before the advantages (refilled with dynamic sampling), an errored probe is no mode
evidence, and the step metrics count it (`reward_errors`, `reward_error_rate`), with
`rl.max_reward_error_rate` stopping the run. Unit level: a scripted engine, no model."""

from __future__ import annotations

import logging
import pickle
import re

import pytest

from kat_megatron.config.schema import RLConfig
from kat_megatron.data.autothink import (
    GENERATION_PREFIX,
    MODES,
    AutoThinkResponse,
    forced_mode_prefix,
    render_response,
)
from kat_megatron.data.tokenizer import encode_text
from kat_megatron.inference.types import Completion
from kat_megatron.rl import rewards, rollouts
from kat_megatron.rl.parts import build_parts
from kat_megatron.rl.prompts import PromptRecord, PromptSampler
from kat_megatron.rl.rewards import (
    REWARD_COMPONENTS,
    RewardConfig,
    RewardError,
    mode_evidence,
    score_rollout,
)
from kat_megatron.rl.rollouts import RolloutCollector
from kat_megatron.rl.step_metrics import (
    report_reward_errors,
    reward_error_metrics,
    reward_errors,
    rollout_metrics,
)
from kat_megatron.verifiers import VERIFIERS, VerifyResult
from kat_megatron.verifiers.sandbox import SandboxUnavailable

JUDGE = "I will decide how to answer this query."
BROKEN = "sandbox: could not start (setup_timeout)"


class FlakyVerifier:
    """Correct iff the answer is "4"; "boom" is an internal failure (`error`), "crash" raises
    RuntimeError, "badref" ValueError (an invalid reference), "nosandbox" SandboxUnavailable."""

    name = "flaky"

    def __call__(self, response: str, reference) -> VerifyResult:
        answer = response.strip()
        if answer == "boom":
            return VerifyResult(False, 0.0, BROKEN, error=BROKEN)
        if answer == "crash":
            raise RuntimeError("harness broke")
        if answer == "badref":
            raise ValueError("flaky reference must be a string")
        if answer == "nosandbox":
            raise SandboxUnavailable("no network namespace")
        return VerifyResult(answer == "4", float(answer == "4"))


@pytest.fixture(autouse=True)
def flaky(monkeypatch):
    monkeypatch.setitem(VERIFIERS, "flaky", FlakyVerifier)
    monkeypatch.setattr(rewards, "_VERIFIERS", {})  # no cached instances across tests


META = {"verifier": "flaky", "reference": "4"}


def completion(answer: str, mode: str = "think_off") -> str:
    think = "r" if mode == "think_on" else None
    text = render_response(AutoThinkResponse(JUDGE, mode, answer, think))
    return text[len(GENERATION_PREFIX) :]


# ------------------------------------------------------------------------- scores
def test_verifier_error_is_carried_on_the_score_not_scored():
    ok = score_rollout(completion("4"), 10, "stop", META, RewardConfig())
    assert ok.error is None and ok.correct == 1.0
    s = score_rollout(completion("boom"), 10, "stop", META, RewardConfig())
    assert s.error == f"correctness: verifier 'flaky': {BROKEN}"
    # placeholders, marked as such; the other components are still computed
    assert (s.correct, s.answer_reward, s.components["format"]) == (0.0, 0.0, 1.0)
    s = score_rollout(completion("crash"), 10, "stop", META, RewardConfig(partial_credit=True))
    assert s.error == "correctness: verifier 'flaky' raised RuntimeError: harness broke"
    # a forced-mode probe carries it too
    prefix = forced_mode_prefix("think_on")
    probe = score_rollout(prefix + "r\n</think>\n\n<answer>\nboom\n</answer>", 9, "stop", META,
                          RewardConfig(), forced_mode="think_on")  # fmt: skip
    assert probe.forced and probe.mode == "think_on" and probe.error is not None
    # the scores reach the other TP ranks pickled (broadcast_object_list): the string survives
    assert pickle.loads(pickle.dumps([[s, probe]])) == [[s, probe]]


def test_invalid_reference_and_missing_sandbox_propagate():
    with pytest.raises(ValueError, match="flaky reference"):
        score_rollout(completion("badref"), 10, "stop", META, RewardConfig())
    with pytest.raises(SandboxUnavailable):
        score_rollout(completion("nosandbox"), 10, "stop", META, RewardConfig())
    with pytest.raises(ValueError, match="needs 'verifier' and 'reference'"):
        score_rollout(completion("4"), 10, "stop", {"verifier": "flaky"}, RewardConfig())


def test_component_reward_error_and_bugs(monkeypatch):
    def judge_len(ctx, cfg):
        if "boom" in ctx.text:
            raise RewardError("reward model unreachable")
        if "crash" in ctx.text:
            raise ZeroDivisionError("a bug")
        return 0.5

    monkeypatch.setitem(REWARD_COMPONENTS, "judge_len", judge_len)
    cfg = RewardConfig(weights={"correctness": 1.0, "judge_len": 1.0})
    assert score_rollout(completion("4"), 5, "stop", META, cfg).answer_reward == 1.5
    # the first failing component names the error (correctness comes first in the registry)
    s = score_rollout(completion("boom"), 5, "stop", META, cfg)
    assert s.error.startswith("correctness: ") and s.components["judge_len"] == 0.0
    s = score_rollout("x\n</judge>\nboom? no: 4", 5, "stop", META, cfg)
    assert s.error == "judge_len: reward model unreachable"
    with pytest.raises(ZeroDivisionError):  # a bug in a component is not a reward error
        score_rollout("x\n</judge>\ncrash 4", 5, "stop", META, cfg)


def test_errored_probe_is_no_mode_evidence():
    cfg = RewardConfig()
    rolls = [score_rollout(completion(a), 5, "stop", META, cfg) for a in ("4", "5")]
    on = forced_mode_prefix("think_on")
    good = score_rollout(on + "r\n</think>\n\n<answer>\n4\n</answer>", 5, "stop", META, cfg,
                         forced_mode="think_on")  # fmt: skip
    bad = score_rollout(on + "r\n</think>\n\n<answer>\nboom\n</answer>", 5, "stop", META, cfg,
                        forced_mode="think_on")  # fmt: skip
    assert mode_evidence(rolls, [good, bad]) == mode_evidence(rolls, [good])
    assert mode_evidence(rolls, [good]).p_on == 1.0
    assert mode_evidence(rolls, [bad]).p_on is None  # not a 0: no evidence at all


# ------------------------------------------------------------------------- groups
class ScriptedEngine:
    """`generate` answers prompt "question k" with `script[k]` (one answer per rollout) and its
    forced-mode probes with `probes[k]`; text parsed back from the prompt ids."""

    def __init__(self, tokenizer, script: dict[int, list[str]], probes: dict[int, str]):
        self.tok, self.script, self.probes = tokenizer, script, probes
        self.calls: list[int] = []

    def generate(self, prompts, params, seeds=None):
        out, seen = [], {}
        for ids in prompts:
            text = self.tok.decode(ids)
            k = int(re.search(r"question (\d+)", text).group(1))
            mode = next((m for m in MODES if text.endswith(forced_mode_prefix(m))), None)
            if mode is None:
                j = seen[k] = seen.get(k, -1) + 1
                body = completion(self.script[k][j])
            else:
                full = GENERATION_PREFIX + completion(self.probes[k], mode)
                body = full[len(GENERATION_PREFIX + forced_mode_prefix(mode)) :]
            token_ids = encode_text(self.tok, body)
            out.append(Completion(list(ids), token_ids, [-1.0] * len(token_ids), body, "stop"))
        self.calls.append(len(prompts))
        return out


def collector(monkeypatch, tokenizer, script, probes=None, **rl_fields) -> RolloutCollector:
    monkeypatch.setattr(rollouts, "_dp", lambda: (0, 1, None))
    monkeypatch.setattr(rollouts, "_mp_size", lambda: 1)  # one rank: no model-parallel group
    prompts = [
        PromptRecord(f"q{k}", [{"role": "user", "content": f"question {k}"}], "all", dict(META))
        for k in sorted(script)
    ]
    rl = RLConfig(prompts="unused", group_size=2, shuffle=False, **rl_fields)
    engine = ScriptedEngine(tokenizer, script, probes or {})
    return RolloutCollector(
        engine, tokenizer, prompts, PromptSampler(len(prompts), 0, False), build_parts(rl), rl, 0
    )


def test_errored_group_is_dropped_and_counted(monkeypatch, tiny_tokenizer):
    script = {0: ["4", "5"], 1: ["4", "boom"], 2: ["5", "4"]}
    col = collector(monkeypatch, tiny_tokenizer, script, prompts_per_step=3)
    got = col.collect()
    assert [g.record.id for g in got.groups] == ["q0", "q2"]  # q1 dropped whole
    assert (got.groups_generated, got.groups_trained, got.groups_errored) == (3, 2, 1)
    samples = col.samples(got.groups)
    assert len(samples) == 4  # the dropped group's 2 rollouts are not trained on
    errs = [r["reward_error"] for r in got.rows]
    assert errs == [None, None, None, f"correctness: verifier 'flaky': {BROKEN}", None, None]
    m = rollout_metrics(got.rows, mode_weight=1.0)
    # acc over the groups whose rewards were all computed (q0, q2): the placeholder 0 and the
    # dropped group's other rollout are left out; behaviour keys cover every rollout
    assert m["acc"] == 0.5 and m["acc/all"] == 0.5 and m["response_tokens"] > 0
    e = reward_error_metrics(got.rows, got.probe_errors, got.probes)
    assert e == {"reward_errors": 1, "reward_error_rate": 1 / 6}
    # every group errored: nothing to train on, the reward keys are absent, the counts are not
    col = collector(monkeypatch, tiny_tokenizer, {0: ["boom", "4"]}, prompts_per_step=1)
    got = col.collect()
    assert (got.groups_trained, got.groups_errored, got.groups) == (0, 1, [])
    m = rollout_metrics(got.rows, mode_weight=1.0)
    assert "acc" not in m and "reward/total" not in m and m["think_on_rate"] == 0.0


def test_dynamic_sampling_refills_an_errored_group(monkeypatch, tiny_tokenizer):
    script = {0: ["4", "5"], 1: ["crash", "4"], 2: ["4", "4"], 3: ["5", "4"]}
    col = collector(monkeypatch, tiny_tokenizer, script, prompts_per_step=2,
                    dynamic_sampling=True, max_refill_rounds=2)  # fmt: skip
    got = col.collect()
    # round 0: q0 (signal), q1 (errored); round 1: q2 (no signal); round 2: q3 (signal)
    assert [g.record.id for g in got.groups] == ["q0", "q3"]
    assert (got.rounds, got.groups_generated, got.groups_trained) == (3, 4, 2)
    assert got.groups_errored == 1 and got.prompt_ids == ["q0", "q1", "q2", "q3"]
    assert reward_error_metrics(got.rows, [], 0)["reward_errors"] == 1


def test_errored_probes_are_left_out_of_the_evidence(monkeypatch, tiny_tokenizer):
    script = {0: ["4", "5"], 1: ["5", "4"], 2: ["boom", "4"]}
    col = collector(monkeypatch, tiny_tokenizer, script, probes={0: "boom", 1: "4"},
                    prompts_per_step=3, forced_probes=1)  # fmt: skip
    got = col.collect()
    g0, g1 = got.groups
    assert [p.error is not None for p in g0.probes] == [True]
    assert g0.adv.p_on is None and g0.adv.preferred_mode is None  # no evidence, not p_on = 0
    assert g1.adv.p_on == 1.0 and g1.adv.preferred_mode == "think_on"
    # the errored group q2 is not probed (it is dropped anyway): 2 probes, not 3
    assert got.probes == 2 and col.engine.calls == [6, 2]
    assert got.probe_errors == [f"correctness: verifier 'flaky': {BROKEN}"]
    e = reward_error_metrics(got.rows, got.probe_errors, got.probes)
    assert e == {"reward_errors": 2, "reward_error_rate": 2 / 8}  # probes count as scored


# ------------------------------------------------------------------------- report / abort
def test_report_logs_once_and_aborts_above_the_limit(caplog):
    rows = [{"reward_error": None}] * 3 + [{"reward_error": "code: sandbox down " + "x" * 500}]
    errors = reward_errors(rows, ["probe: harness broke"])
    metrics = reward_error_metrics(rows, ["probe: harness broke"], probes=1)
    assert metrics == {"reward_errors": 2, "reward_error_rate": 0.4}
    with caplog.at_level(logging.WARNING, logger="kat"):
        report_reward_errors(7, errors, metrics, max_rate=None)
        report_reward_errors(7, errors, metrics, max_rate=0.4)  # at the limit: not exceeded
        report_reward_errors(7, errors, metrics, max_rate=0.5, warn=False)  # ranks > 0
    assert len(caplog.records) == 2
    msg = caplog.records[0].getMessage()
    assert "step 7: 2 reward computation(s) failed" in msg and "probe: harness broke" in msg
    assert len(msg) < 1000  # long errors are cut
    with pytest.raises(RuntimeError, match=r"reward_error_rate 0.400 .* rl.max_reward_error_rate"):
        report_reward_errors(7, errors, metrics, max_rate=0.3, warn=False)
    report_reward_errors(8, [], {"reward_errors": 0, "reward_error_rate": 0.0}, max_rate=0.0)


def test_max_reward_error_rate_config():
    assert RLConfig().max_reward_error_rate is None
    assert RLConfig(max_reward_error_rate=0.0).max_reward_error_rate == 0.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="rl.max_reward_error_rate"):
            RLConfig(max_reward_error_rate=bad)
