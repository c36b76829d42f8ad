"""Run a list of conversions and verifications on one set of gloo ranks (for the tests):

    python -m torch.distributed.run --nproc-per-node 2 tests/checkpoint/convert_worker.py PLAN.json

PLAN.json: {"steps": [...], "results": PATH}. A step is
    {"op": "import", "source": {"kind": "hf"|"mcore"|"upcycle", "path": ..., "spec": {...}},
     "out": DIR, "layout": "tp2", "stream": false}
    {"op": "verify", "name": NAME, "hf": DIR, "mcore": DIR, "layouts": ["tp1", "tp2"]}
These are the library calls `kat convert hf-to-mcore|reshard|upcycle-moe|verify` make on each
rank (`stream`: the default one-process writer; otherwise `--ranks`, the model built at the layout); running them in one launch (re-initialising Megatron's groups per layout) keeps the suite
fast. Rank 0 writes {NAME: [verify rows]} to PATH.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist


def source_for(spec: dict):
    from kat_megatron.checkpoint.sources import HFSource, McoreSource
    from kat_megatron.checkpoint.upcycle import UpcycleSource, UpcycleSpec

    if spec["kind"] == "hf":
        return HFSource(spec["path"])
    if spec["kind"] == "mcore":
        return McoreSource(spec["path"])
    return UpcycleSource(McoreSource(spec["path"]), UpcycleSpec(**spec["spec"]))


def main() -> None:
    from kat_megatron.checkpoint.importer import ImportJob, run_import, run_stream_import
    from kat_megatron.checkpoint.verify import Layout, random_tokens, run_verify
    from kat_megatron.config.schema import ParallelConfig
    from kat_megatron.parallel.init import init_process_group, shutdown
    from kat_megatron.utils.logging import setup_logging

    setup_logging("WARNING")
    plan = json.loads(Path(sys.argv[1]).read_text())
    init_process_group(ParallelConfig())
    results = {}
    for step in plan["steps"]:
        if step["op"] == "import":
            source = source_for(step["source"])
            parallel = Layout.parse(step["layout"]).parallel()
            job = ImportJob(step["out"], parallel, "fp32", step["source"])
            (run_stream_import if step.get("stream") else run_import)(source, job)
        else:
            from kat_megatron.checkpoint.mcore_io import McoreReader

            vocab = McoreReader(step["mcore"]).model.vocab_size
            batches = random_tokens(vocab, batch=2, seq=24, seed=0)
            layouts = [Layout.parse(x) for x in step["layouts"]]
            results[step["name"]] = run_verify(step["hf"], step["mcore"], layouts, batches)
    if dist.get_rank() == 0:
        Path(plan["results"]).write_text(json.dumps(results, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
