"""Same as `kat convert upcycle-moe`:

    python tools/convert_upcycle_moe.py --mcore DIR --out DIR --experts E --topk K [--granularity G] [--shared-expert]

See `kat convert upcycle-moe --help` and docs/conversion.md.
"""

import sys

from kat_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "upcycle-moe", *sys.argv[1:]]))
