"""Same as `kat convert upscale-depth`:

    python tools/convert_upscale_depth.py --hf DIR --out DIR --layers 80 [--scheme stack|interleave|interleave-identity]

See `kat convert upscale-depth --help` and docs/conversion.md.
"""

import sys

from kat_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "upscale-depth", *sys.argv[1:]]))
