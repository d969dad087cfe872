"""Time of one PAM step over one plain SGD step (same model, same batch): preact_small, 128 x 1x28x28, CPU.

The issue's target is a ratio <= 1.3: PAM adds one forward/backward's worth of nothing, only a few
foreach ops (displacement, global norm, perturb, restore) around the same closure.

    python benchmarks/pam_step.py [--steps 60] [--warmup 10] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from bdsafety.models import ModelSpec, create_model
from bdsafety.optim.pam import PAM


def closure_for(model, optimizer, x, y):
    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def timed_step(model, optimizer, x, y, device) -> float:
    closure = closure_for(model, optimizer, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if getattr(optimizer, "needs_closure", False):
        optimizer.step(closure)
    else:
        closure()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = create_model(ModelSpec("preact_small", 1, 10, (0.2860,), (0.3530,)))
    base = base.to(device).to(memory_format=torch.channels_last).train()
    x = torch.rand(args.batch_size, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    sgd_model, pam_model = copy.deepcopy(base), copy.deepcopy(base)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.1)
    pam = PAM(pam_model.parameters(), rho=0.5, lr=0.01, momentum=0.1)
    times = {"sgd": [], "pam": []}
    for i in range(args.warmup + args.steps):
        # Interleaved, so load changes on shared cores hit both alike.
        for name, model, optimizer in (("sgd", sgd_model, sgd), ("pam", pam_model, pam)):
            elapsed = timed_step(model, optimizer, x, y, device)
            if i >= args.warmup:
                times[name].append(elapsed)
    sgd_ms, pam_ms = (1000 * statistics.median(times[k]) for k in ("sgd", "pam"))
    print(f"device={device} threads={args.threads} batch={args.batch_size} steps={args.steps} "
          f"(median after {args.warmup} warm-up steps)")
    print(f"sgd step: {sgd_ms:.2f} ms   pam step: {pam_ms:.2f} ms   ratio pam/sgd: {pam_ms / sgd_ms:.3f}")
    print(f"distance to theta_bd after {args.warmup + args.steps} PAM steps: {pam.distance():.4f}")


if __name__ == "__main__":
    main()
