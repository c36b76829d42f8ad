"""python tools/preprocess_data.py --input a.jsonl [b.jsonl ...] --output-prefix OUT --tokenizer DIR|tiny [--json-key text] [--workers N] [--append-eod] [--strict]

Tokenizes JSONL files (one {"text": ...} document per line) into the Megatron indexed dataset
OUT.bin / OUT.idx, plus OUT.meta.json (tokenizer, vocab size, documents, tokens, malformed lines,
inputs). Malformed lines are skipped, counted and listed by file and line number; with --strict
the first one is an error. Outputs appear atomically: an interrupted run leaves no OUT.idx.
Exit status: 0 on success, 1 on bad input (missing file, malformed line under --strict).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input", nargs="+", required=True, metavar="JSONL", help="input JSONL file(s), in order"
    )
    p.add_argument(
        "--output-prefix",
        required=True,
        metavar="OUT",
        help="output path prefix: writes OUT.bin, OUT.idx and OUT.meta.json",
    )
    p.add_argument(
        "--tokenizer",
        default="tiny",
        metavar="DIR|tiny",
        help="Hugging Face tokenizer directory, or `tiny` for the packaged one (default: tiny)",
    )
    p.add_argument(
        "--json-key", default="text", help="key of the document text in each line (default: text)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="tokenizing processes; the output is identical for any N (default: 1)",
    )
    p.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append the tokenizer's end-of-document token to each document (default: on)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 1, no output) at the first malformed line instead of skipping it",
    )
    p.add_argument("--chunk-size", type=int, default=64, help="lines per worker task (default: 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    missing = [p for p in args.input if not Path(p).is_file()]
    if missing:  # checked before the (slow) Megatron-Core import
        print(f"preprocess_data: error: input file not found: {missing[0]}", file=sys.stderr)
        return 1
    from kat_megatron.data.preprocess import MalformedInputError, preprocess_jsonl

    try:
        stats = preprocess_jsonl(
            args.input,
            args.output_prefix,
            args.tokenizer,
            json_key=args.json_key,
            workers=args.workers,
            append_eod=args.append_eod,
            strict=args.strict,
            chunk_size=args.chunk_size,
            progress=not args.quiet,
        )
    except (FileNotFoundError, MalformedInputError, ValueError) as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, "
        f"{stats['tokens']} tokens ({stats['dtype']}), {stats['malformed']} malformed line(s) "
        "skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
