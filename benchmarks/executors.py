"""Wall time of one spec with the local executor and with the Ray executor (1 and N Ray CPUs), from empty run
directories, and the Ray executor's overhead per stage.

    python benchmarks/executors.py SPEC.yaml [--ray-cpus 2] [--threads 1] [--out DIR]

Each run starts from an empty directory under DIR. `--threads` is torch's thread count in the driver and in
every Ray task (the same count gives bit-identical results, which is checked). The overhead per stage is
(Ray with 1 CPU − local) / stages: the cost of a task (its setup rebuilt, its parents loaded from disk,
Ray's own scheduling); Ray's own start (`ray.init`) is outside the timings.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/executors"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
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
    result = {"spec": str(args.spec), "stages": stages, "threads": args.threads, "local_s": local,
              **{f"ray_{c}cpu_s": t for c, t in times.items()}, "overhead_per_stage_s": (times[1] - local) / stages,
              "identical_results": identical}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
