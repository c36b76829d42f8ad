"""python tools/build_tiny_tokenizer.py [--output DIR] [--corpus examples/tiny_pretrain/corpus.jsonl]

Regenerates the packaged `tiny` tokenizer (kat_megatron/assets/tiny_tokenizer/) from the
in-repo synthetic corpus, offline and deterministically: rebuilding gives byte-identical files.
With --corpus, also rewrites the tiny example's JSONL corpus (2000 documents, seed 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kat_megatron.data.gpt_data import write_synthetic_corpus  # noqa: E402
from kat_megatron.data.tokenizer import TINY_TOKENIZER_DIR, build_tiny_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--output",
        default=str(TINY_TOKENIZER_DIR),
        help="tokenizer directory to write (default: the packaged asset directory)",
    )
    parser.add_argument(
        "--corpus",
        default=None,
        help="also write the example corpus here (e.g. examples/tiny_pretrain/corpus.jsonl)",
    )
    parser.add_argument(
        "--corpus-docs", type=int, default=2000, help="documents in --corpus (default 2000)"
    )
    args = parser.parse_args(argv)
    out = build_tiny_tokenizer(args.output)
    print(f"wrote {out}")
    if args.corpus:
        path = write_synthetic_corpus(args.corpus, n_docs=args.corpus_docs, seed=0)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
