"""Same as `kat convert reshard`:

    python tools/convert_reshard.py --mcore DIR --out DIR --tp N --pp N [--ep N]

See `kat convert reshard --help` and docs/conversion.md.
"""

import sys

from kat_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "reshard", *sys.argv[1:]]))
