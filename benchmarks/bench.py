"""Speed benchmark of bdsafety (see bdsafety.bench); the same as `bdsafety bench`.

    python benchmarks/bench.py [--out DIR] [--seconds 12] [--threads N] [--profile] [--device cpu]

Prints a Markdown table and writes DIR/bench.json (atomically).
"""

import sys

from bdsafety.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
