"""Same as `kat convert hf-to-mcore`:

    python tools/convert_hf_to_mcore.py --hf DIR --out DIR [--tp N --pp N --ep N --etp N] [--dtype bf16|fp16|fp32]

See `kat convert hf-to-mcore --help` and docs/conversion.md.
"""

import sys

from kat_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))
