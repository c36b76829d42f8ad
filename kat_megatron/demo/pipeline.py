"""`kat demo [--out runs/demo] [--quick] [--nproc 2] [--seed S] [--task easy-hard|steps]`: the
whole AutoThink pipeline, tiny, on CPU.

Steps (each a real `kat` command on `--nproc` gloo ranks; configs in `examples/demo/`):
  1. data       the synthetic task: teacher corpus (Megatron indexed), prompts, eval set
  2. teacher    pretrain a tiny teacher on the corpus (`stage: pretrain`)
  3. kd         MTP-KD a student with one MTP head from the online teacher (`stage: kd`)
  4. autothink  `kat serve` the teacher; `kat data tag` (forced-mode sampling, majority vote),
                `kat data synthesize` (teacher answers), `kat data coldstart` (judges, SFT rows)
  5. sft        SFT the student on the cold-start data (`stage: sft`)
  6. rl         Step-SRPO the student (`stage: rl`)
  7. eval       `kat eval --mode all` of the SFT and the RL student on held-out prompts
  8. export     `kat convert mcore-to-hf` of the RL student
  9. report     OUT/report.md with PNG plots
A rerun skips finished steps (`OUT/.done/`); `--restart` starts over.

`--seed S` seeds every stage from one number: stage k's seed is its base seed + 1000 * S (the
corpus, prompt, eval and gold-row generators; `training.seed` of the teacher, KD, SFT and RL
configs; the per-request seeds of `kat data tag` and `synthesize`; `kat eval --seed`). S = 0 is
the configuration the README's figures were measured with. The seed is recorded in
`OUT/seed.json`; resuming a run with another seed is refused.

`kat demo --ablation --seeds 0,1,2` then trains Step-SRPO, GRPO (mode_weight 0) and no RL from this run's
SFT checkpoint for every seed and reports means and 95% intervals (`demo/ablation.py`).

`--task` picks the synthetic task (`TASKS`): `easy-hard` (default; `data/synthetic_tasks.py`:
sums answered directly, products mod 10 that need steps) or `steps` (`data/synthetic_steps.py`:
one template, products of 1 to 5 factors, judges per mode, so the mode has to be learned from
the content). It is recorded in `OUT/seed.json` with the seed and, like it, fixed for a run.
"""

from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml

from kat_megatron.data import synthetic_steps as steps
from kat_megatron.demo.runner import Runner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo"


@dataclass(frozen=True)
class DemoScale:
    """Sizes of one demo run (`FULL` for `make demo`, `QUICK` for the CI test)."""

    corpus_docs: int
    prompts: int
    eval_prompts: int
    teacher_steps: int
    kd_steps: int
    sft_steps: int
    rl_steps: int
    samples_per_mode: int
    eval_samples: int
    min_sft_rows: int
    """Fewer cold-start rows than this from the teacher are topped up with gold rows (the
    task's reference answers, think-off for easy and think-on for hard) and the report says so."""


FULL = DemoScale(
    corpus_docs=8000, prompts=384, eval_prompts=128, teacher_steps=1000, kd_steps=1000,
    sft_steps=80, rl_steps=30, samples_per_mode=2, eval_samples=1, min_sft_rows=64,
)  # fmt: skip
QUICK = DemoScale(
    corpus_docs=800, prompts=12, eval_prompts=8, teacher_steps=20, kd_steps=10,
    sft_steps=10, rl_steps=2, samples_per_mode=1, eval_samples=1, min_sft_rows=16,
)  # fmt: skip


@dataclass(frozen=True)
class DemoTask:
    """A synthetic task the demo can run on: a data module with `make_tasks(n, seed)`,
    `pretrain_documents(n, seed)`, `coldstart_records(n, seed, think_on_rate)`, `prompt_record`
    and `write_jsonl`."""

    module: str
    gold_think_on_rate: dict[str, float]
    """Per category, the think_on fraction of gold top-up rows (see `DemoScale.min_sft_rows`)."""
    judge_templates: dict[str, str] | None = None
    """`kat data coldstart`'s judge text per mode; None: `examples/demo/coldstart.yaml`'s."""
    held_out: tuple[str, ...] = ()
    """Categories whose prompt and eval questions the teacher corpus leaves out
    (`pretrain_documents(exclude=...)`): answered directly, they test the teacher's competence,
    not its memory of a small question space."""

    def data(self) -> ModuleType:
        return importlib.import_module(self.module)


TASKS = {
    "easy-hard": DemoTask(
        "kat_megatron.data.synthetic_tasks", {"easy": 0.0, "hard": 1.0}, held_out=("hard",)
    ),
    "steps": DemoTask(steps.__name__, steps.GOLD_THINK_ON_RATE, dict(steps.JUDGE)),
}
"""`kat demo --task NAME`; easy-hard is the default and what the README measured."""


def latest(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run (raises if there is none)."""
    from kat_megatron.training.checkpoint_meta import latest_checkpoint

    found = latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{run_dir}: the run wrote no complete checkpoint")
    return found


SEED_STRIDE = 1000
"""Stage seeds of `--seed S` are their base seeds + SEED_STRIDE * S (bases differ by < 1000)."""


def config_seed(config: str) -> int:
    """`training.seed` of demo config `config` (its base seed)."""
    return int(yaml.safe_load((EXAMPLES / config).read_text())["training"]["seed"])


class Demo:
    """The demo's steps over one output directory."""

    def __init__(
        self, out: Path, scale: DemoScale, nproc: int, echo=print, seed: int = 0,
        task: str = "easy-hard",
    ) -> None:  # fmt: skip
        if task not in TASKS:
            raise ValueError(f"task={task!r}: expected one of {list(TASKS)}")
        self.out = Path(out)
        self.s = scale
        self.nproc = nproc
        self.seed = seed
        self.task_name = task
        self.task = TASKS[task]
        self.data = self.out / "data"
        self.r = Runner(self.out, total=len(self.steps()), echo=echo)

    def stage_seed(self, base: int) -> int:
        """The seed of a stage whose seed is `base` at `--seed 0`."""
        return base + SEED_STRIDE * self.seed

    def check_seed(self) -> None:
        """Record the run's seed and task in OUT/seed.json; refuse to resume a run made with
        others (a file without a task is an easy-hard run)."""
        path = self.out / "seed.json"
        if path.is_file():
            doc = json.loads(path.read_text())
            recorded_task = doc.get("task", "easy-hard")
            checks = (("--seed", doc["seed"], self.seed), ("--task", recorded_task, self.task_name))
            for flag, recorded, mine in checks:
                if recorded != mine:
                    raise ValueError(
                        f"{self.out} was started with {flag} {recorded}; rerun with {flag} "
                        f"{recorded} to resume it, or --restart to start over with {flag} {mine}"
                    )
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seed": self.seed, "task": self.task_name}) + "\n")

    def steps(self):
        return [
            ("data", self.make_data),
            ("teacher", self.train_teacher),
            ("kd", self.distil),
            ("autothink", self.autothink_data),
            ("sft", self.sft),
            ("rl", self.rl),
            ("eval", self.evaluate),
            ("export", self.export),
            ("report", self.report),
        ]

    def run(self) -> Path:
        self.check_seed()
        for name, fn in self.steps():
            self.r.step(name, fn)
        return self.out / "report.md"

    # 1
    def make_data(self) -> None:
        from kat_megatron.data.preprocess import preprocess_jsonl

        st = self.task.data()
        held_out: set[str] = set()
        for name, n, base in (("prompts", self.s.prompts, 2), ("eval", self.s.eval_prompts, 3)):
            seed = self.stage_seed(base)
            examples = st.make_tasks(n, seed)
            held_out |= {ex.question for ex in examples if ex.category in self.task.held_out}
            recs = [{**st.prompt_record(ex), "intent": "math"} for ex in examples]
            st.write_jsonl(self.data / f"{name}.jsonl", recs)
        kw = {"exclude": held_out} if self.task.held_out else {}
        docs = st.pretrain_documents(self.s.corpus_docs, seed=self.stage_seed(1), **kw)
        corpus = st.write_jsonl(self.data / "corpus.jsonl", ({"text": d} for d in docs))
        preprocess_jsonl([corpus], self.data / "corpus", "tiny", workers=1, progress=False)
        kept = f", {len(held_out)} {'/'.join(self.task.held_out)} questions held out of it"
        self.r.echo(f"    task {self.task_name}: {len(docs)} corpus documents"
                    f"{kept if held_out else ''}, {self.s.prompts} prompts, "
                    f"{self.s.eval_prompts} eval prompts in {self.data}")  # fmt: skip

    def _train(self, config: str, run: str, *overrides: str) -> Path:
        run_dir = self.out / run
        seed = f"training.seed={self.stage_seed(config_seed(config))}"
        self.r.kat(
            "train", str(EXAMPLES / config), f"run.dir={run_dir}", seed, *overrides,
            nproc=self.nproc,
        )  # fmt: skip
        return latest(run_dir)

    # 2
    def train_teacher(self) -> None:
        self._train(
            "teacher.yaml", "teacher", f"data.paths=[{self.data / 'corpus'}]",
            f"training.steps={self.s.teacher_steps}",
        )  # fmt: skip

    # 3
    def distil(self) -> None:
        self._train(
            "student_kd.yaml", "student_kd", f"data.paths=[{self.data / 'corpus'}]",
            f"training.steps={self.s.kd_steps}",
            f"kd.teacher.ckpt={latest(self.out / 'teacher')}",
        )  # fmt: skip

    # 4
    def autothink_data(self) -> None:
        work = self.out / "autothink"
        with self.r.serve(latest(self.out / "teacher"), nproc=self.nproc) as url:
            client = f"client.base_url={url}"
            self.r.kat(
                "data", "tag", str(EXAMPLES / "tag.yaml"), client,
                f"input={self.data / 'prompts.jsonl'}", f"output={work / 'tag'}",
                f"samples_per_mode={self.s.samples_per_mode}", f"seed={self.stage_seed(0)}",
            )  # fmt: skip
            self.r.kat(
                "data", "synthesize", str(EXAMPLES / "synthesize.yaml"), client,
                f"input={work / 'tag' / 'data.jsonl'}", f"output={work / 'synth'}",
                f"seed={self.stage_seed(0)}",
            )  # fmt: skip
        judges = self.task.judge_templates
        self.r.kat(
            "data", "coldstart", str(EXAMPLES / "coldstart.yaml"),
            f"input={work / 'synth' / 'data.jsonl'}", f"output={work / 'coldstart'}",
            *([f"judge_templates={json.dumps(judges)}"] if judges else []),
        )  # fmt: skip
        self._sft_rows(work)

    def _sft_rows(self, work: Path) -> None:
        """`autothink/sft.jsonl`: the cold-start rows, topped up with gold rows if too few."""
        st = self.task.data()
        made = [json.loads(x) for x in (work / "coldstart" / "data.jsonl").read_text().splitlines()]
        gold = []
        if len(made) < self.s.min_sft_rows:
            need = self.s.min_sft_rows - len(made)
            gold = st.coldstart_records(
                need, seed=self.stage_seed(4), think_on_rate=self.task.gold_think_on_rate
            )
            self.r.echo(
                f"    WARNING: the teacher's pipeline kept {len(made)} rows (< {self.s.min_sft_rows}"
                f"); adding {len(gold)} gold rows from the task's reference answers"
            )
        rows = [{"messages": r["messages"], "source": "pipeline"} for r in made]
        rows += [{"messages": r["messages"], "source": "gold"} for r in gold]
        st.write_jsonl(work / "sft.jsonl", rows)
        stats = {"pipeline_rows": len(made), "gold_rows": len(gold)}
        (work / "sft_stats.json").write_text(json.dumps(stats))
        self.r.echo(f"    SFT rows: {len(made)} from the pipeline, {len(gold)} gold")

    # 5
    def sft(self) -> None:
        self._train(
            "student_sft.yaml", "student_sft",
            f"data.jsonl=[{self.out / 'autothink' / 'sft.jsonl'}]",
            f"training.steps={self.s.sft_steps}",
            f"checkpoint.load={latest(self.out / 'student_kd')}",
        )  # fmt: skip

    # 6
    def rl(self) -> None:
        self._train(
            "student_rl.yaml", "student_rl", f"rl.prompts={self.data / 'prompts.jsonl'}",
            f"training.steps={self.s.rl_steps}",
            f"checkpoint.load={latest(self.out / 'student_sft')}",
        )  # fmt: skip

    # 7
    def evaluate(self) -> None:
        for run in ("student_sft", "student_rl"):
            self.r.kat(
                "eval", "--ckpt", str(latest(self.out / run)),
                "--data", str(self.data / "eval.jsonl"), "--mode", "all",
                "--samples", str(self.s.eval_samples), "--out", str(self.out / "eval" / run),
                "--max-new-tokens", "96", "--no-progress", "--seed", str(self.stage_seed(0)),
                nproc=self.nproc,
            )  # fmt: skip

    # 8
    def export(self) -> None:
        self.r.kat(
            "convert", "mcore-to-hf", "--mcore", str(latest(self.out / "student_rl")),
            "--out", str(self.out / "hf"), "--overwrite",
        )  # fmt: skip

    # 9
    def report(self) -> None:
        from kat_megatron.eval.report import write_report

        path = write_report(
            self.out,
            rl_metrics_jsonl=self.out / "student_rl" / "metrics.jsonl",
            eval_json_by_mode={"all": self.out / "eval" / "student_rl" / "eval.json"},
            extra_sections=self._sections(),
            title=f"AutoThink demo report (the Step-SRPO student, task {self.task_name})",
        )
        self.r.echo(f"    report: {path}")

    def _sections(self) -> dict[str, str]:
        sft_md = (self.out / "eval" / "student_sft" / "eval.md").read_text().split("\n", 1)[-1]
        # the SFT run's own plots, not the report's
        for png in ("accuracy.png", "tokens.png", "frontier.png"):
            sft_md = sft_md.replace(f"]({png})", f"](eval/student_sft/{png})")
        sft_md = sft_md.replace("\n## ", "\n### ")
        stats = json.loads((self.out / "autothink" / "sft_stats.json").read_text())
        data = (
            f"Cold-start SFT rows: {stats['pipeline_rows']} built by `kat data tag/synthesize/"
            "coldstart` against the served teacher"
        )
        if stats["gold_rows"]:
            data += (
                f", plus {stats['gold_rows']} gold rows (reference answers) because the pipeline "
                f"kept fewer than {self.s.min_sft_rows}"
            )
        data += ". Summaries: `autothink/*/summary.json`."
        rows = "\n".join(f"| {k} | {v:.0f} |" for k, v in self.r.times.items())
        where = "\n".join(
            f"- {name}: `{self.out / name}`"
            for name in ("teacher", "student_kd", "autothink", "student_sft", "student_rl",
                         "eval", "hf", "logs")
        )  # fmt: skip
        return {
            "Before RL: the SFT student": sft_md,
            "AutoThink data": data,
            "Step times (s)": "| step | seconds |\n|---|---|\n" + rows,
            "Where": where,
        }


def run_demo(
    out: Path, quick: bool = False, nproc: int = 2, restart: bool = False, seed: int = 0,
    task: str = "easy-hard",
) -> Path:  # fmt: skip
    """Run (or resume) the demo of `task` into `out` with pipeline seed `seed`; return the
    report's path."""
    out = Path(out)
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {list(TASKS)}")
    if restart and out.exists():
        shutil.rmtree(out)
    demo = Demo(out, QUICK if quick else FULL, nproc, seed=seed, task=task)
    return demo.run()
