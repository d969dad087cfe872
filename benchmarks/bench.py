"""Speed benchmark of bdsafety (see bdsafety.bench): `python benchmarks/bench.py [--out bench.json]`.

Prints a Markdown table and writes the full record as JSON (atomically). Uses every available core.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from bdsafety.bench import format_table, profile_train, run_benchmark
from bdsafety.store import write_json
from bdsafety.train import resolve_device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the JSON record")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per case")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: the cores available to this process)")
    parser.add_argument("--profile", action="store_true", help="also profile a few train steps (top ops by self CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    result = run_benchmark(device, seconds_per_case=args.seconds)
    if args.profile:
        result["profile"] = profile_train(device)
    write_json(args.out, result)
    print(format_table(result))
    for row in result.get("profile", []):
        print(f"{row['self_cpu_ms']:8.2f} ms/step {100 * row['share']:5.1f} %  {row['op']}")
    print(f"\nwritten to {args.out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
