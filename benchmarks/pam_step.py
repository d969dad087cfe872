"""Time of one PAM step over one plain SGD step on the same batch (the defenses issue's target: <= 1.3x).

    python benchmarks/pam_step.py [--seconds 10] [--threads 2] [--device cpu]

The same measurement as the `PAM step / SGD step` row of `python benchmarks/bench.py` (speed.pam_overhead):
CPU: preact_small, batch 128 of 1x28x28; CUDA: resnet18, batch 512 of 3x32x32, bf16 autocast.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the checkout root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.speed import default_workload, pam_overhead, workload_and_data  # noqa: E402
from bdsafety.train import resolve_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per optimizer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = default_workload(resolve_device(args.device), None, None, None)
    work, setup = workload_and_data(work, n_train=4 * work.batch_size, n_test=10)
    result = pam_overhead(work, setup.attacker_train, steps=5, seconds=args.seconds, min_calls=3)
    print(f"{work.model_name}, batch {work.batch_size}, {work.dtype_name}, {work.device}, {args.threads} threads")
    print(f"sgd step: {result['sgd_step_ms']:.2f} ms   pam step: {result['pam_step_ms']:.2f} ms   "
          f"ratio pam/sgd: {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
