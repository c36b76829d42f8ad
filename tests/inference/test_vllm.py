"""A kat export served by vLLM: `pytest tests/inference/test_vllm.py` (needs `make vllm`).

A tiny model (the `tiny-dense` preset: 32-wide heads, the narrowest vLLM's CPU attention takes)
is trained for a few steps, exported with `kat convert mcore-to-hf` as `make demo` exports its
student (tokenizer and AutoThink template included), loaded by vLLM's CPU build exactly as a
user would (`LLM(model=DIR)`), and its greedy completions are compared with transformers on the
same folder and with kat's own rollout engine on the checkpoint.

Tolerance: token ids must be equal. All three run fp32; they differ in kernels and summation
order (~1e-6 on logits), so the comparison is only meaningful where the greedy path has no
near-tie: `test_greedy_path_has_clear_margins` checks that every step's top-1 beats the runner-up
by > 1e-3.

vLLM lives in its own virtual environment (`.venv-vllm`, made by `make vllm`; `make test` makes
it and sets KAT_REQUIRE_VLLM=1, so there a missing vLLM fails instead of skipping).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import engine_worker as W  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("KAT_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
MAX_NEW = 16
CHATS = [
    [{"role": "user", "content": "What is 12 plus 7?"}],
    [{"role": "user", "content": "Tell me about the big horse."}],
]

pytestmark = pytest.mark.timeout(900)

if not VLLM_PYTHON.exists():
    if os.environ.get("KAT_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"KAT_REQUIRE_VLLM=1 but {VLLM_PYTHON} is missing: run `make vllm`")
    pytest.skip(
        f"vLLM not installed ({VLLM_PYTHON}; `make vllm` makes it)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(checkpoint dir, HF folder) of a tiny model trained 60 steps."""
    from kat_megatron.checkpoint.exporter import export_to_hf

    root = tmp_path_factory.mktemp("vllm")
    ckpt = W.train_checkpoint(root, steps=60)
    return ckpt, export_to_hf(ckpt, root / "hf")


@pytest.fixture(scope="module")
def prompts(export):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(export[1]))
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    texts += W.PROMPTS[:3]  # plain text too
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def transformers_greedy(export, prompts):
    """(new token ids, smallest top-1 margin) per prompt: argmax of a full forward per step
    (no stop tokens, as vLLM's ignore_eos)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(export[1]), torch_dtype=torch.float32)
    model.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            seq, margin = list(p), float("inf")
            for _ in range(MAX_NEW):
                top2 = model(torch.tensor([seq])).logits[0, -1].topk(2)
                margin = min(margin, float(top2.values[0] - top2.values[1]))
                seq.append(int(top2.indices[0]))
            outs.append((seq[len(p) :], margin))
    return outs


def test_greedy_path_has_clear_margins(transformers_greedy):
    assert min(margin for _, margin in transformers_greedy) > 1e-3


def test_vllm_greedy_equals_transformers_and_kat(export, prompts, transformers_greedy, tmp_path):
    ckpt, hf = export
    spec = tmp_path / "prompts.json"
    spec.write_text(json.dumps({"prompts": prompts, "max_new_tokens": MAX_NEW}))
    out = tmp_path / "vllm.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(Path(__file__).parent / "vllm_worker.py"), str(hf), str(spec),
         str(out)], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    print(f"vLLM {got['version']}: {len(got['token_ids'])} greedy completions")
    vllm_ids = got["token_ids"]
    assert [len(ids) for ids in vllm_ids] == [MAX_NEW] * len(prompts)
    assert vllm_ids == [ids for ids, _ in transformers_greedy]

    from kat_megatron.inference.loading import engine_from_checkpoint
    from kat_megatron.inference.types import SamplingParams
    from kat_megatron.parallel.init import shutdown

    engine, _, _ = engine_from_checkpoint(ckpt, max_sequence_length=256)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
        kat_ids = [c.token_ids for c in engine.generate(prompts, params)]
    finally:
        shutdown()
    assert kat_ids == vllm_ids
