"""Time of reading a BackdoorBench record folder (bdsafety.poisons.backdoorbench.read_record); target <= 20 s.

    python benchmarks/record_read.py [--count 50000] [--test-count 1000] [--repeats 1]

Writes, in a temporary folder, a record in BackdoorBench's layout (tests/backdoorbench_layout.py) holding
`--count` random 32x32 RGB PNG poisons in bd_train_dataset/ and `--test-count` in bd_test_dataset/, then
prints the seconds each read_record of it takes (the first read also pays for a cold page cache only where
the OS dropped the files it just wrote).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the layout writer the tests use

from backdoorbench_layout import write_record  # noqa: E402

from bdsafety.poisons.backdoorbench import read_record  # noqa: E402


def split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images, original labels, bd labels, indices) of `count` random 32x32 RGB poisons, target 0."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(1, 10, count)
    return images, labels, np.zeros(count, dtype=np.int64), rng.permutation(count)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000, help="PNG poisons in bd_train_dataset/")
    parser.add_argument("--test-count", type=int, default=1_000, help="PNG poisons in bd_test_dataset/")
    parser.add_argument("--repeats", type=int, default=1, help="timed reads")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "record" / "badnet_bench"
        start = time.perf_counter()
        write_record(folder, *split(args.count, 0), *split(args.test_count, 1))
        print(f"wrote {args.count} + {args.test_count} PNG poisons in {time.perf_counter() - start:.1f} s "
              f"({os.cpu_count()} cores)")
        for _ in range(args.repeats):
            start = time.perf_counter()
            record = read_record(folder)
            seconds = time.perf_counter() - start
            print(f"read_record: {seconds:.2f} s for {len(record.train.indices)} train + {len(record.test.indices)} "
                  f"test poisons ({1e6 * seconds / (args.count + args.test_count):.0f} us per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
