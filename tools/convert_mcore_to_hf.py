"""Same as `kat convert mcore-to-hf`:

    python tools/convert_mcore_to_hf.py --mcore DIR --out DIR [--dtype ...] [--tokenizer DIR] [--chat-template autothink|keep|FILE]

See `kat convert mcore-to-hf --help` and docs/conversion.md.
"""

import sys

from kat_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))
