"""Speed benchmark of bdsafety (benchmarks/speed.py), run from a source checkout:

    python benchmarks/bench.py [--out DIR] [--seconds 12] [--threads N] [--profile] [--device cpu]
    python benchmarks/bench.py --from DIR --docs docs/results/speed.md   # the docs' results page of a measurement

Prints a Markdown table and writes DIR/bench.json and DIR/env.json, where it ran (atomically). `--docs PAGE` also
writes a results page of the documentation site naming the commit, machine, threads and torch of the measurement
(docs/results/index.md); `--from DIR` writes it from an earlier measurement without measuring. It is a script
outside the library, not a `bdsafety` command: the library never imports benchmarks/ (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the checkout root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.pages import add_page_arguments, environment, run_script, write_page  # noqa: E402
from benchmarks.speed import profile_train, run_benchmark  # noqa: E402
from benchmarks.speed_table import format_table  # noqa: E402
from bdsafety import store  # noqa: E402
from bdsafety.cli import configure  # noqa: E402
from bdsafety.train import resolve_device  # noqa: E402

SCRIPT = "benchmarks/bench.py"


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
    add_page_arguments(bench, "Speed: python benchmarks/bench.py")
    return bench


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    configure(args.quiet)
    if args.source:
        if not args.docs:
            parser().error("--from writes a results page: give it --docs docs/results/NAME.md")
        return write_page(SCRIPT, parser(), args, args.source, store.BENCH_FILE, page_body)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    where = environment(str(device))
    result = run_benchmark(device, seconds_per_case=args.seconds)
    if args.profile:
        result["profile"] = profile_train(device)
    out = Path(args.out)
    store.write_json(out / store.BENCH_FILE, result)
    store.write_json(out / store.ENV_FILE, where)
    print("\n".join(result_lines(result)))
    print(f"written to {out / store.BENCH_FILE} ({result['total_s']:.0f} s)")
    return write_page(SCRIPT, parser(), args, out, store.BENCH_FILE, page_body) if args.docs else 0


def result_lines(result: dict) -> list[str]:
    """The measurement as Markdown: the table, then the profile's top operations where it was profiled."""
    lines = format_table(result).splitlines()
    if result.get("profile"):
        lines += ["", "Where a training step's time goes (self CPU time per step):", "",
                  "| op | ms / step | share |", "|---|---|---|"]
        lines += [f"| `{row['op']}` | {row['self_cpu_ms']:.2f} | {100 * row['share']:.1f} % |"
                  for row in result["profile"]]
    return lines


def page_body(result: dict) -> list[str]:
    return result_lines(result) + ["", f"The benchmark took {result['total_s']:.0f} s. What each case measures is "
                                       "on the [Speed](../speed.md) page."]


if __name__ == "__main__":
    run_script(main)
