"""Speed benchmark of bdsafety (benchmarks/speed.py), run from a source checkout:

    python benchmarks/bench.py [--out DIR] [--seconds 12] [--threads N] [--profile] [--device cpu]

Prints a Markdown table and writes DIR/bench.json (atomically). It is a script outside the library, not a
`bdsafety` command: the library never imports benchmarks/ (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the checkout root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.speed import profile_train, run_benchmark  # noqa: E402
from benchmarks.speed_table import format_table  # noqa: E402
from bdsafety import store  # noqa: E402
from bdsafety.cli import configure  # noqa: E402
from bdsafety.train import resolve_device  # noqa: E402


def parser() -> argparse.ArgumentParser:
    bench = argparse.ArgumentParser(prog="python benchmarks/bench.py",
                                    description="speed benchmark: training loop vs a PIL/DataLoader pipeline, MFU, "
                                                "PAM, eval")
    bench.add_argument("--out", default=".", help="directory for bench.json (default: the current one)")
    bench.add_argument("--seconds", type=float, default=12.0, help="timed seconds per case (default 12)")
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default: every available core)")
    bench.add_argument("--profile", action="store_true", help="also profile a few training steps (top ops)")
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    bench.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    return bench


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    configure(args.quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    result = run_benchmark(device, seconds_per_case=args.seconds)
    if args.profile:
        result["profile"] = profile_train(device)
    store.write_json(Path(args.out) / store.BENCH_FILE, result)
    print(format_table(result))
    for row in result.get("profile", []):
        print(f"{row['self_cpu_ms']:8.2f} ms/step {100 * row['share']:5.1f} %  {row['op']}")
    print(f"written to {Path(args.out) / store.BENCH_FILE} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
