"""Wall time of one spec with the local executor and with the Ray executor (1 and N Ray CPUs), from empty run
directories, and the Ray executor's overhead per stage.

    python benchmarks/executors.py benchmarks/executors-grid.yaml [--ray-cpus 2] [--threads 1] [--out DIR]
    python benchmarks/executors.py --from runs/executors --docs docs/results/executors.md   # its results page

Each run starts from an empty directory under DIR. `--threads` is torch's thread count in the driver and in
every Ray task (the same count gives bit-identical results, which is checked). The overhead per stage is
(Ray with 1 CPU − local) / stages: the cost of a task (its setup rebuilt, its parents loaded from disk,
Ray's own scheduling); Ray's own start (`ray.init`) is outside the timings. The numbers go to DIR/executors.json,
where it ran to DIR/env.json; `--docs PAGE` writes a results page of the docs from them (docs/results/index.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.pages import add_page_arguments, environment, run_script, write_page  # noqa: E402
from bdsafety import store  # noqa: E402
from bdsafety.pipeline import load_plan  # noqa: E402
from bdsafety.pipeline.executors.local import LocalExecutor  # noqa: E402
from bdsafety.pipeline.executors.ray_cluster import RayExecutor  # noqa: E402
from bdsafety.pipeline.graph import build_graph  # noqa: E402
from bdsafety.pipeline.run import run_experiment  # noqa: E402


def timed(plan, out: Path, executor) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    run_experiment(plan, out, torch.device("cpu"), executor)
    return time.perf_counter() - started


SCRIPT, RESULT_FILE = "benchmarks/executors.py", "executors.json"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, nargs="?", help="the spec to time (e.g. benchmarks/executors-grid.yaml)")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/executors"))
    add_page_arguments(parser, "The local and the Ray executor: python benchmarks/executors.py")
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.source or not args.spec:
        if not (args.source and args.docs):
            parser().error("give a spec to time, or --from DIR --docs docs/results/NAME.md")
        return write_page(SCRIPT, parser(), args, args.source, RESULT_FILE, page_body)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    where = environment("cpu")
    plan = load_plan(args.spec)
    stages = len(build_graph(plan).nodes)
    local = timed(plan, args.out / "local", LocalExecutor())
    import ray

    times = {}
    for cpus in sorted({1, args.ray_cpus}):
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        times[cpus] = timed(plan, args.out / f"ray{cpus}", RayExecutor(num_cpus=cpus))
        ray.shutdown()
    identical = all((args.out / f"ray{c}" / "results.json").read_bytes() == (args.out / "local" / "results.json")
                    .read_bytes() for c in times)
    result = {"spec": args.spec.as_posix(), "stages": stages, "threads": args.threads, "local_s": local,
              "ray_s": {str(c): t for c, t in times.items()}, "overhead_per_stage_s": (times[1] - local) / stages,
              "identical_results": identical, "ray": ray.__version__}
    store.write_json(args.out / RESULT_FILE, result)
    store.write_json(args.out / store.ENV_FILE, where)
    print(json.dumps(result, indent=2))
    return write_page(SCRIPT, parser(), args, args.out, RESULT_FILE, page_body) if args.docs else 0


def page_body(result: dict) -> list[str]:
    """The timings as a Markdown table."""
    ray = "; ".join(f"{float(t):.1f} s with {c} Ray CPU{'s' if c != '1' else ''}" for c, t in result["ray_s"].items())
    return [f"`{result['spec']}`, {result['stages']} stages, {result['threads']} torch thread(s) in the driver and in "
            f"every Ray task, Ray {result['ray']}, each run from an empty directory:", "",
            "| stages | local executor | Ray executor | Ray's cost per stage | results.json identical |",
            "|---|---|---|---|---|",
            f"| {result['stages']} | {result['local_s']:.1f} s | {ray} | {result['overhead_per_stage_s']:.2f} s | "
            f"{'yes' if result['identical_results'] else '**no**'} |", "",
            "Ray's cost per stage is (Ray with 1 CPU − local) / stages: a task rebuilds its setup, loads its parents "
            "from disk and is scheduled by Ray. [Command line](../cli.md) says when the Ray executor pays."]


if __name__ == "__main__":
    run_script(main)
