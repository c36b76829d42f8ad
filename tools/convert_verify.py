"""Same as `kat convert verify`:

    python tools/convert_verify.py --hf DIR --mcore DIR [--tp N --pp N --ep N] [--nproc N] [--prompts FILE] [--tolerance 1e-3]

See `kat convert verify --help` and docs/conversion.md.
"""

import sys

from kat_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "verify", *sys.argv[1:]]))
