"""`kat convert hf-to-mcore|mcore-to-hf|reshard|verify|upscale-depth|upcycle-moe ...`.

    kat convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N --ep N --etp N] [--dtype bf16]
    kat convert mcore-to-hf --mcore DIR --out DIR [--dtype bf16] [--tokenizer DIR]
    kat convert reshard --mcore DIR --out DIR --tp N --pp N [--ep N]
    kat convert verify --hf DIR --mcore DIR [--tp N --pp N --ep N --etp N] [--prompts FILE]
    kat convert upscale-depth --hf DIR --out DIR --layers 80 [--scheme stack]
    kat convert upcycle-moe --mcore DIR --out DIR --experts E --topk K [--granularity G]

Commands that build our model start their own local ranks (tp * pp * dp, through torchrun) unless
they already run under torchrun or SLURM. `--mcore` is anything the checkpoint resolver takes:
one `iter_N/`, a checkpoints folder (its newest) or a run directory. The work lives in
`kat_megatron/checkpoint/`; see docs/conversion.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

from kat_megatron.launch.local import launch_local, under_launcher

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def _dtype(name: str | None):
    import torch

    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _precision(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B)", text.strip().upper())
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 5GB or 500MB")
    return int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[m.group(2)])


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces `args` (to re-run it on local ranks)."""
    out = ["convert", args.convert_command]
    for action in args._parser._actions:
        value = getattr(args, action.dest, None)
        skip = action.dest in ("help", "nproc")  # torchrun would take --nproc for its own
        if not action.option_strings or skip or value in (None, False):
            continue
        flag = action.option_strings[0]
        if isinstance(value, list):
            out += [x for v in value for x in (flag, str(v))]
        else:
            out += [flag] if value is True else [flag, str(value)]
    return out


def _parallel(args: argparse.Namespace):
    from kat_megatron.config.schema import ParallelConfig

    return ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)


def world_for(model, parallel) -> int:
    """The fewest ranks that run `parallel` for `model` (tp * pp * the smallest valid dp)."""
    from kat_megatron.config.schema import check_layout

    check_layout(model, parallel)
    for dp in range(1, parallel.ep * parallel.cp + 1):
        world = parallel.model_parallel_size * dp
        try:
            check_layout(model, parallel, world_size=world)
            return world
        except ValueError:
            continue
    raise ValueError(f"no world size fits layout {parallel}")


def _on_ranks(args: argparse.Namespace, nproc: int, work) -> int:
    """Run `work()` here (one rank, or under a launcher) or start `nproc` local ranks."""
    if nproc > 1 and not under_launcher():
        return launch_local(nproc, _argv(args))
    from kat_megatron.parallel.init import shutdown
    from kat_megatron.utils.logging import setup_logging

    setup_logging()
    try:
        return work() or 0
    finally:
        shutdown()


def _import(args: argparse.Namespace, source, provenance: dict) -> int:
    """Stream `source` into a checkpoint from one process, or (`--ranks`) fill our model built
    at the layout on tp * pp * dp ranks. Both write the same checkpoint."""
    from kat_megatron.checkpoint.hf_io import check_output_dir

    check_output_dir(args.out, args.overwrite)
    parallel = _parallel(args)
    nproc = world_for(source.model, parallel)  # also validates the layout
    precision = args.dtype or _precision(source.dtype)

    def work() -> None:
        from kat_megatron.checkpoint.importer import ImportJob, run_import, run_stream_import

        job = ImportJob(args.out, parallel, precision, provenance, source.tokenizer)
        (run_import if args.ranks else run_stream_import)(source, job)

    return _on_ranks(args, nproc if args.ranks else 1, work)


def hf_to_mcore(args: argparse.Namespace) -> int:
    from kat_megatron.checkpoint.sources import HFSource

    source = HFSource(args.hf)
    source.check()
    where = {"kind": "hf", "path": os.path.abspath(args.hf), "architecture": source.spec.arch}
    return _import(args, source, where)


def reshard(args: argparse.Namespace) -> int:
    from kat_megatron.checkpoint.sources import McoreSource

    source = McoreSource(args.mcore)
    return _import(args, source, {"kind": "mcore", "path": str(source.reader.path.resolve())})


def upcycle_moe(args: argparse.Namespace) -> int:
    from kat_megatron.checkpoint.sources import McoreSource
    from kat_megatron.checkpoint.upcycle import UpcycleSource, UpcycleSpec

    dense = McoreSource(args.mcore)
    spec = UpcycleSpec(
        args.experts, args.topk, args.granularity, args.shared_expert, args.first_k_dense, args.seed
    )
    where = {"kind": "upcycle", "path": str(dense.reader.path.resolve()), **spec.__dict__}
    return _import(args, UpcycleSource(dense, spec), where)


def mcore_to_hf(args: argparse.Namespace) -> int:
    from kat_megatron.checkpoint.exporter import export_to_hf
    from kat_megatron.utils.logging import setup_logging

    setup_logging()
    export_to_hf(
        args.mcore,
        args.out,
        dtype=_dtype(args.dtype),
        arch=args.arch,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        max_shard_bytes=_bytes(args.max_shard_size),
        overwrite=args.overwrite,
    )
    return 0


def upscale_depth(args: argparse.Namespace) -> int:
    from kat_megatron.checkpoint.upscale import upscale_depth as run

    plan = run(
        args.hf, args.out, args.layers, args.scheme, _bytes(args.max_shard_size), args.overwrite
    )
    print(json.dumps({"layers": len(plan), "sources": [src for src, _ in plan],
                      "identity": [j for j, (_, z) in enumerate(plan) if z]}))  # fmt: skip
    return 0


def verify(args: argparse.Namespace) -> int:
    from kat_megatron.checkpoint.mcore_io import McoreReader
    from kat_megatron.checkpoint.verify import Layout, check_vocab_padding
    from kat_megatron.config.schema import check_layout

    reader = McoreReader(args.mcore)
    model = reader.model
    recorded = reader.meta["config"].get("parallel") or {}  # the layout it was written at
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else recorded.get(k, default)
             for k, default in (("tp", 1), ("pp", 1), ("ep", 1), ("etp", None))}  # fmt: skip
    layout = Layout(**sizes)
    layouts = [layout]
    args.tp, args.pp, args.ep, args.etp = layout.tp, layout.pp, layout.ep, layout.etp
    args.nproc = args.nproc or world_for(model, layout.parallel())
    world = int(os.environ.get("WORLD_SIZE", args.nproc)) if under_launcher() else args.nproc
    check_layout(model, layout.parallel(), world_size=world)
    check_vocab_padding(reader, layout.tp)
    if args.nproc > 1 and not under_launcher():
        with tempfile.TemporaryDirectory() as tmp:
            args.result_file = str(Path(tmp) / "verify.jsonl")
            code = launch_local(args.nproc, _argv(args))
            if code:
                return code
            return _report(json.loads(x) for x in Path(args.result_file).read_text().splitlines())
    return _on_ranks(args, 1, lambda: _verify_rank(args, model, layouts))


def _verify_rank(args: argparse.Namespace, model, layouts) -> int:
    import torch.distributed as dist

    from kat_megatron.checkpoint.verify import prompt_tokens, random_tokens, run_verify
    from kat_megatron.config.schema import ParallelConfig
    from kat_megatron.parallel.init import init_process_group

    init_process_group(ParallelConfig())
    if args.prompts:
        batches = prompt_tokens(args.prompts, args.tokenizer or args.hf)
    else:
        batches = random_tokens(model.vocab_size, args.batch, args.seq, args.seed)
    top = max(int(b.max()) for b in batches)
    if top >= model.vocab_size:
        raise ValueError(f"token id {top} >= the model's vocabulary {model.vocab_size}: "
                         "the tokenizer does not belong to this model")  # fmt: skip
    results = run_verify(args.hf, args.mcore, layouts, batches)
    rows = [dict(r, tolerance=args.tolerance, ok=_worst(r) <= args.tolerance) for r in results]
    if dist.get_rank() != 0:
        return 0
    if args.result_file:
        Path(args.result_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0
    return _report(rows)


def _worst(row: dict) -> float:
    """The largest |logit diff| of a verify row over the main head and its MTP heads."""
    return max([row["max_abs_logit_diff"], *(m["max_abs_logit_diff"] for m in row.get("mtp", []))])


def _report(rows) -> int:
    ok = True
    for row in rows:
        print(json.dumps(row), flush=True)
        ok = ok and row["ok"]
    return 0 if ok else 1


def _layout_flags(p: argparse.ArgumentParser, recorded: bool = False) -> None:
    """--tp/--pp/--ep/--etp (and --ranks); `recorded`: each defaults to the source
    checkpoint's own layout (verify) instead of 1."""
    what = "default: as the checkpoint was written" if recorded else "default 1"
    one = None if recorded else 1
    p.add_argument("--tp", type=int, default=one, help=f"tensor-parallel size ({what})")
    p.add_argument("--pp", type=int, default=one, help=f"pipeline-parallel size ({what})")
    p.add_argument("--ep", type=int, default=one, help=f"expert-parallel size ({what})")
    etp = what if recorded else "default: = tp"
    p.add_argument("--etp", type=int, default=None, help=f"expert tensor-parallel size ({etp})")
    if recorded:
        return
    p.add_argument(
        "--ranks",
        action="store_true",
        help="build the model on tp*pp*dp local ranks and fill it, instead of streaming the "
        "same checkpoint from one process",
    )


def _out_flags(p: argparse.ArgumentParser, dtype_help: str) -> None:
    p.add_argument("--out", required=True, help="output directory (written as OUT.tmp, renamed)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help=dtype_help)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _add(sub, name: str, func, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=func, _parser=p)
    return p


def register(sub) -> None:
    c = sub.add_parser("convert", help="Hugging Face <-> Megatron checkpoints, reshard, verify")
    csub = c.add_subparsers(dest="convert_command", required=True)
    p = _add(csub, "hf-to-mcore", hf_to_mcore, "Hugging Face folder -> kat checkpoint")
    p.add_argument("--hf", required=True,
                   help="Qwen2 / Qwen3-MoE folder with safetensors (its mtp/ heads too)")  # fmt: skip
    _out_flags(p, "checkpoint dtype (default: the HF dtype)")
    _layout_flags(p)
    p = _add(csub, "mcore-to-hf", mcore_to_hf,
             "kat checkpoint -> Hugging Face folder (tokenizer and chat template included; MTP "
             "heads, if any, in OUT/mtp/: docs/conversion.md)")  # fmt: skip
    p.add_argument(
        "--mcore",
        required=True,
        help="kat checkpoint: an iter_N dir, a checkpoints folder or a run dir",
    )
    _out_flags(p, "safetensors dtype (default: the checkpoint's)")
    p.add_argument("--arch", default=None, help="Qwen2ForCausalLM or Qwen3MoeForCausalLM")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to include (default: the one the checkpoint records, data.tokenizer)",
    )
    p.add_argument("--chat-template", default="autothink", help="autothink | keep | FILE.jinja")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (5GB)")
    p = _add(csub, "reshard", reshard, "kat checkpoint -> kat checkpoint at another layout")
    p.add_argument(
        "--mcore", required=True, help="source checkpoint (iter_N, checkpoints/ or run dir)"
    )
    _out_flags(p, "checkpoint dtype (default: the source's)")
    _layout_flags(p)
    p = _add(csub, "verify", verify, "compare logits of transformers and ours (one JSON line)")
    p.add_argument("--hf", required=True, help="Hugging Face folder (the reference)")
    p.add_argument(
        "--mcore", required=True, help="kat checkpoint (iter_N, checkpoints/ or run dir)"
    )
    _layout_flags(p, recorded=True)
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="local ranks for our model (default: what the layout needs, tp*pp*dp)",
    )
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--tokenizer", default=None, help="tokenizer for --prompts (default: --hf)")
    p.add_argument("--batch", type=int, default=2, help="random prompts: batch (default 2)")
    p.add_argument("--seq", type=int, default=32, help="random prompts: length (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |logit diff| (1e-3)")
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    p = _add(csub, "upscale-depth", upscale_depth, "depth up-scaling of a Hugging Face folder")
    p.add_argument("--hf", required=True, help="source Hugging Face folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layers", type=int, required=True, help="target number of layers")
    p.add_argument("--scheme", default="stack", help="stack | interleave | interleave-identity")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p = _add(csub, "upcycle-moe", upcycle_moe, "dense kat checkpoint -> MoE kat checkpoint")
    p.add_argument(
        "--mcore", required=True, help="dense checkpoint (iter_N, checkpoints/ or run dir)"
    )
    _out_flags(p, "checkpoint dtype (default: the source's)")
    p.add_argument("--experts", type=int, required=True, help="routed experts E")
    p.add_argument("--topk", type=int, required=True, help="experts per token K")
    p.add_argument("--granularity", type=int, default=1, help="slices per dense FFN (1)")
    p.add_argument("--shared-expert", action="store_true", help="add the dense MLP as shared")
    p.add_argument("--first-k-dense", type=int, default=0, help="keep the first k layers dense")
    p.add_argument("--seed", type=int, default=0, help="router initialisation seed")
    _layout_flags(p)
