"""Speed benchmark: bdsafety's device-resident training loop against a conventional PIL + DataLoader pipeline.

One run on one machine and model measures (all numbers in a JSON-able dict):

1. `train.fit` throughput: uint8 tensors on the device, batched `augment` (crop pad 2 + flip), channels_last,
   SGD 0.1/0.9/5e-4, cross-entropy, in the default profile's precision (fp32); the real `fit` is called on a
   subset sized to a fixed number of steps. `fit` in the other precision is measured too (bf16 where the
   hardware has it), so the gain splits into pipeline, memory format and precision.
2. The same model, batch and optimizer fed the torchvision way (`conventional_pipeline`, written by hand;
   torchvision is not a dependency): a Dataset decoding each uint8 array with `PIL.Image.fromarray`, BadNets
   patch per poisoned sample in `__getitem__`, RandomCrop(pad 2) -> RandomHorizontalFlip -> ToTensor ->
   Normalize, DataLoader, the model in PyTorch's default NCHW layout and fp32 as the usual toolkits train it;
   the same pipeline feeding a channels_last model is measured too.
3. Model FLOPs (conv/linear multiply-adds x2; training = 3x forward) and MFU against the dense-matmul peak
   measured in the same run and dtype (for the other precision too, against its own dtype's peak).
4. The cost of one PAM step relative to one plain SGD step on the same batch.
5. Evaluation throughput (`train.predict`) and the wall time of a 21-point LMC scan.

Cases compared with each other (1 vs 2, PAM vs SGD, the input pipelines alone) are timed in turn, round robin,
so that the drifting load of a shared machine hits them alike; every rate is a median over calls after a warm-up
call, and every speed-up the median of per-round ratios (with quartiles), since one round's calls are adjacent in
time. After a call with DataLoader workers the bench waits untimed while they refill their prefetch queue, so that
their work does not land in the next case's timing.

Synthetic data only (no download): `data.synthetic` images, BadNets 5% poisoning to class 0, 10 classes.
On CPU the workload is Fashion-MNIST-shaped (1x28x28, preact_small, batch 128); on CUDA it is CIFAR-shaped
(3x32x32, resnet18, batch 512).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .conventional_pipeline import (CROP_PAD, PREFETCH, ConventionalDataset, conventional_dataset, conventional_loader,
                                   endless)
from bdsafety.audits.connectivity import LinearModeConnectivity
from bdsafety.data import ImageSet, augment, to_float
from bdsafety.data.synthetic import synthetic_bundle
from bdsafety.pipeline import AttackSpec, DataSpec, Setup, prepare
from bdsafety.models import ModelSpec, create_model
from bdsafety.optim.pam import PAM
from bdsafety.profiles import TRAIN_PROFILES
from bdsafety.train import (LossFn, TrainConfig, batch_indices, cross_entropy, fit, optimizer_step, predict,
                    native_bf16, resolve_precision, with_precision)

log = logging.getLogger(__name__)

NUM_CLASSES = 10
POISON_RATE, TARGET = 0.05, 0  # the Fashion-MNIST target run's BadNets settings
RECIPE = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)  # the paper's backdoor-training SGD (ALGORITHMS §3)
PAM_RECIPE = dict(lr=0.01, momentum=0.1, weight_decay=0.0)  # the PAM defense's base SGD (ALGORITHMS §4.8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the matmul dtype of each training precision
INTERLEAVED = "cases called in turn (round robin) after one warm-up call each; median over calls"
SPEEDUP_METHOD = ("per round, the best conventional case's duration over bdsafety's (same steps and batch); median "
                  "and quartiles over rounds")
WORKER_SETTLE_S = 0.25  # untimed pause after a call with DataLoader workers (their prefetch takes ~40 ms of CPU)


@dataclass(frozen=True)
class Workload:
    """What is benchmarked: one model and batch shape on one device, in one training precision."""

    device: torch.device
    model_name: str
    shape: tuple[int, int, int]
    batch_size: int
    precision: str  # "fp32" or "bf16" (autocast), resolved for the device
    mean: tuple[float, ...] = (0.5,)  # the data's normalisation statistics (set from the bundle)
    std: tuple[float, ...] = (0.25,)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def dtype_name(self) -> str:
        return "fp32" if self.precision == "fp32" else f"{self.precision} autocast"

    def model(self, seed: int, normalized_input: bool = False,
              memory_format: torch.memory_format = torch.channels_last) -> nn.Module:
        """A fresh model in `memory_format`; `normalized_input`: the in-model normalisation is the identity, since
        the conventional pipeline normalises in its transforms (same compute either way)."""
        channels = self.shape[0]
        mean, std = ((0.0,) * channels, (1.0,) * channels) if normalized_input else (self.mean, self.std)
        torch.manual_seed(seed)
        spec = ModelSpec(self.model_name, channels, NUM_CLASSES, mean, std)
        return create_model(spec).to(self.device).to(memory_format=memory_format)

    def loss_fn(self) -> LossFn:
        return with_precision(cross_entropy(), self.precision, self.device)

    def train_config(self, precision: str | None = None) -> TrainConfig:
        """One epoch of the backdoor-training recipe at this batch size (and `precision`, default the workload's)."""
        return TrainConfig(epochs=1, batch_size=self.batch_size, schedule="constant", crop_pad=CROP_PAD, flip=True,
                           drop_last=True, precision=precision or self.precision, **RECIPE)


def default_workload(device: torch.device, batch_size: int | None, model_name: str | None,
                     shape: tuple[int, int, int] | None) -> Workload:
    """CPU: Fashion-MNIST shape, preact_small, batch 128 (cpu profile). CUDA: CIFAR shape, resnet18, batch 512
    (paper profile). Precision: the profile's, resolved for the device (bf16 where the hardware has it)."""
    precision = resolve_precision(TRAIN_PROFILES["paper" if device.type == "cuda" else "cpu"].precision, device)
    if device.type == "cuda":
        return Workload(device, model_name or "resnet18", tuple(shape or (3, 32, 32)), batch_size or 512, precision)
    return Workload(device, model_name or "preact_small", tuple(shape or (1, 28, 28)), batch_size or 128, precision)


def make_setup(shape: tuple[int, int, int], n_train: int, n_test: int, seed: int = 0) -> Setup:
    """Synthetic 10-class data of `shape`, BadNets-poisoned at 5% (the real pipeline's `prepare`)."""
    channels, height, width = shape
    if height != width:
        raise ValueError(f"the synthetic data is square; got {height}x{width}")
    bundle = synthetic_bundle(seed, NUM_CLASSES, channels, height, n_train, n_test)
    return prepare(DataSpec("synthetic"), AttackSpec("badnets", POISON_RATE, TARGET), seed, bundle=bundle)


def workload_and_data(work: Workload, n_train: int, n_test: int, seed: int = 0) -> tuple[Workload, Setup]:
    """The synthetic setup for `work`, and `work` with the data's normalisation statistics."""
    setup = make_setup(work.shape, n_train, n_test, seed)
    return replace(work, mean=setup.bundle.mean, std=setup.bundle.std), setup


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(cases: dict[str, Callable[[], float]], seconds: float, min_calls: int) -> dict[str, list[float]]:
    """Call each case once as warm-up, then all in turn until `seconds` per case and `min_calls` rounds.

    Interleaving makes the ratios fair on a shared machine whose load drifts. Each case returns the
    duration it measured itself (so setup outside its timed region is excluded).
    """
    for case in cases.values():
        case()
    durations, started = {name: [] for name in cases}, time.perf_counter()
    while len(durations[next(iter(cases))]) < min_calls or time.perf_counter() - started < seconds * len(cases):
        for name, case in cases.items():
            durations[name].append(case())
    return durations


def rate_summary(items_per_call: int, durations: list[float]) -> dict:
    """Median and best items/s over timed calls."""
    return {"images_per_s": items_per_call / statistics.median(durations),
            "best_images_per_s": items_per_call / min(durations), "calls": len(durations),
            "items_per_call": items_per_call}


def paired_speedup(slow: list[float], fast: list[float]) -> dict:
    """How many times faster `fast` is than `slow`, from the durations of calls made in the same round: adjacent in
    time, so a drift of the machine's speed cancels in each ratio. Median and quartiles of the per-round ratios."""
    ratios = sorted(s / f for s, f in zip(slow, fast))
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": median, "q1": q1, "q3": q3, "rounds": len(ratios)}


# ---- 1. bdsafety's training loop ---------------------------------------------------------------------------


def fit_case(work: Workload, data: ImageSet, steps: int,
             precision: str | None = None) -> tuple[Callable[[], float], nn.Module]:
    """One call = the real `train.fit`, one epoch over a resident subset of exactly `steps` full batches.

    Returns the call (giving fit's own `duration_s`: its epoch loop, ending with a host sync) and the model.
    """
    subset = data.subset(torch.arange(steps * work.batch_size)).to(work.device)  # resident, as in fit
    config, model, seeds = work.train_config(precision), work.model(seed=1), iter(range(10**9))
    return lambda: fit(model, subset, config, seed=next(seeds))["duration_s"], model


def fit_batches(work: Workload, data: ImageSet, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless training batches built exactly as in `train.fit`'s inner loop (up to the optimizer step)."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = data.images.to(work.device), data.labels.to(work.device)
    while True:
        for idx in batch_indices(len(labels), work.batch_size, gen, drop_last=True):
            idx = idx.to(work.device)
            x = augment(to_float(images[idx]), CROP_PAD, True, gen)
            yield x.contiguous(memory_format=torch.channels_last), labels[idx]


# ---- 2. the conventional pipeline (conventional_pipeline.py) feeding the same model -------------------------


def conventional_batches(work: Workload, dataset: ConventionalDataset, workers: int,
                         memory_format: torch.memory_format) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless batches from the DataLoader, moved to the device in the model's memory format."""
    for x, y in endless(conventional_loader(dataset, work.batch_size, workers, work.device)):
        x = x.to(work.device, non_blocking=True).contiguous(memory_format=memory_format)
        yield x, y.to(work.device, non_blocking=True)


def conventional_case(work: Workload, dataset: ConventionalDataset, workers: int, steps: int,
                      memory_format: torch.memory_format = torch.contiguous_format) -> Callable[[], float]:
    """One call = `steps` steps of the same model/batch/SGD fed by a DataLoader over `dataset`; returns seconds.

    In fp32 and by default in PyTorch's memory format (NCHW contiguous), as the usual toolkits train;
    channels_last is bdsafety's choice, measured separately as an ablation."""
    model = work.model(seed=1, normalized_input=True, memory_format=memory_format).train()
    loss_fn = cross_entropy()
    optimizer = torch.optim.SGD(model.parameters(), **RECIPE)
    batches = conventional_batches(work, dataset, workers, memory_format)

    def one_call() -> float:
        for _ in range(PREFETCH * workers):  # made while other cases ran; producing them is not this call's work
            next(batches)
        started = time.perf_counter()
        for _ in range(steps):
            optimizer_step(model, optimizer, loss_fn, *next(batches))
        synchronize(work.device)
        seconds = time.perf_counter() - started
        if workers:  # the workers refill their prefetch queue now; let them finish before the next case is timed
            time.sleep(WORKER_SETTLE_S)
        return seconds

    return one_call


def input_pipelines(work: Workload, data: ImageSet, dataset: ConventionalDataset, seconds: float,
                    min_calls: int) -> dict:
    """Milliseconds to produce one training batch without the model: fit's batch path vs the DataLoader (0 workers)."""

    def per_batch_ms(batches: Iterator, count: int) -> float:
        synchronize(work.device)
        started = time.perf_counter()
        for _ in range(count):
            next(batches)
        synchronize(work.device)
        return 1e3 * (time.perf_counter() - started) / count

    fast, slow = fit_batches(work, data), conventional_batches(work, dataset, 0, torch.channels_last)
    times = round_robin({"bdsafety": lambda: per_batch_ms(fast, 20), "conventional": lambda: per_batch_ms(slow, 5)},
                        seconds / 4, min_calls)
    fast_ms, slow_ms = statistics.median(times["bdsafety"]), statistics.median(times["conventional"])
    ratio = paired_speedup(times["conventional"], times["bdsafety"])["median"]
    return {"bdsafety_ms_per_batch": fast_ms, "conventional_ms_per_batch": slow_ms, "ratio": ratio,
            "method": "perf_counter around batch construction only (no model), interleaved, median over calls after "
                      "a warm-up; conventional: DataLoader next() with 0 workers incl. collate"}


# ---- 3. FLOPs, matmul peak, MFU -----------------------------------------------------------------------------


def forward_flops(model: nn.Module, shape: tuple[int, int, int], device: torch.device) -> int:
    """FLOPs of one image's forward pass: 2 x multiply-adds of every Conv2d and Linear (elementwise ops ignored)."""
    macs = []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            macs.append(output.numel() * module.in_channels // module.groups * kernel)
        else:
            macs.append(output.numel() * module.in_features)

    probe = copy.deepcopy(model).eval()
    hooks = [m.register_forward_hook(count) for m in probe.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        probe(torch.zeros(1, *shape, device=device))
    for hook in hooks:
        hook.remove()
    return 2 * sum(macs)


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], repeats: int = 3) -> dict:
    """Best dense torch.mm FLOP/s over square sizes (2n^3 FLOPs each), after one warm-up per size."""
    best, best_n = 0.0, None
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            torch.mm(a, b, out=out)
            synchronize(device)
            rate = 2 * n**3 / (time.perf_counter() - started)
            if rate > best:
                best, best_n = rate, n
    return {"flops_per_s": best, "best_size": best_n, "sizes": list(sizes), "repeats": repeats, "dtype": str(dtype),
            "method": "torch.mm(out=) on square matrices, perf_counter per call, best of repeats x sizes"}


def utilization(forward: int, train_images_per_s: float, peak: float) -> dict:
    achieved = 3 * forward * train_images_per_s  # backward ~ 2x forward
    return {"forward_flops_per_image": forward, "train_flops_per_image": 3 * forward,
            "achieved_flops_per_s": achieved, "mfu": achieved / peak}


# ---- 4. PAM against SGD -------------------------------------------------------------------------------------


def pam_overhead(work: Workload, data: ImageSet, steps: int, seconds: float, min_calls: int) -> dict:
    """Median time of `optimizer_step` with PAM and with plain SGD (same base recipe) on one fixed batch."""
    x, y = next(fit_batches(work, data))
    loss_fn, reference = work.loss_fn(), list(work.model(seed=2).parameters())  # θ_bd != θ: a real displacement
    sgd_model, pam_model = work.model(seed=1), work.model(seed=1)
    optimizers = {"sgd": (sgd_model, torch.optim.SGD(sgd_model.parameters(), **PAM_RECIPE)),
                  "pam": (pam_model, PAM(pam_model.parameters(), rho=0.5, reference=reference, **PAM_RECIPE))}

    def block(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], float]:
        def one_call() -> float:
            synchronize(work.device)
            started = time.perf_counter()
            for _ in range(steps):
                optimizer_step(model, optimizer, loss_fn, x, y)
            synchronize(work.device)
            return (time.perf_counter() - started) / steps
        return one_call

    times = round_robin({name: block(*pair) for name, pair in optimizers.items()}, seconds / 2, min_calls)
    sgd_s, pam_s = statistics.median(times["sgd"]), statistics.median(times["pam"])
    ratio = paired_speedup(times["pam"], times["sgd"])["median"]
    return {"sgd_step_ms": 1e3 * sgd_s, "pam_step_ms": 1e3 * pam_s, "ratio": ratio,
            "method": f"train.optimizer_step on one fixed batch, blocks of {steps} steps, SGD and PAM in turn; "
                      "median per-step time over blocks after one warm-up block each; ratio: median of per-round "
                      "ratios"}


# ---- 5. evaluation and the LMC scan -------------------------------------------------------------------------


def eval_throughput(work: Workload, model: nn.Module, images: Tensor, seconds: float, min_calls: int,
                    batch_sizes: tuple[int, ...] = (256, 1024)) -> dict:
    """`train.predict` images/s at each of `batch_sizes`; the first (the CPU default, 256) is the headline."""
    images = images.to(work.device)

    def case(batch_size: int) -> Callable[[], float]:
        def one_call() -> float:
            started = time.perf_counter()
            predict(model, images, batch_size=batch_size)
            synchronize(work.device)
            return time.perf_counter() - started
        return one_call

    times = round_robin({str(b): case(b) for b in batch_sizes}, seconds / len(batch_sizes), min_calls)
    by_batch = {b: rate_summary(len(images), durations) for b, durations in times.items()}
    return {**by_batch[str(batch_sizes[0])], "batch_size": batch_sizes[0], "by_batch_size": by_batch,
            "method": "perf_counter around train.predict (inference mode) per batch size; " + INTERLEAVED}


def lmc_scan(work: Workload, backdoored: nn.Module, purified: nn.Module, setup: Setup, points: int) -> dict:
    """Wall time of one `LinearModeConnectivity` scan (BN statistics interpolated, the default)."""
    images = len(setup.bundle.test) + len(setup.triggered_test)
    started = time.perf_counter()
    LinearModeConnectivity(points=points).run({"backdoored": backdoored, "purified": purified}, setup.audit_data(), 0)
    synchronize(work.device)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "points": points, "images_per_point": images,
            "images_per_s": points * images / seconds,
            "implementation": "bdsafety.audits.connectivity.LinearModeConnectivity(bn_mode='interp').run",
            "method": "perf_counter, one scan"}


# ---- the whole run ------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(work: Workload) -> dict:
    return {"torch": torch.__version__, "device": str(work.device), "device_name": device_name(work.device),
            "threads": torch.get_num_threads(), "available_cores": len(os.sched_getaffinity(0)),
            "mkldnn_enabled": torch.backends.mkldnn.enabled, "dtype": work.dtype_name, "model": work.model_name,
            "input_shape": list(work.shape), "batch_size": work.batch_size, "memory_format": "channels_last"}


def run_benchmark(device: torch.device, seconds_per_case: float = 12.0, batch_size: int | None = None,
                  model_name: str | None = None, shape: tuple[int, int, int] | None = None, *,
                  n_train: int = 10_000, n_test: int = 10_000, steps_per_call: int = 20, min_calls: int = 3,
                  workers: tuple[int, ...] = (0, 2), matmul_sizes: tuple[int, ...] | None = None,
                  lmc_points: int = 21, seed: int = 0) -> dict:
    """Run every case once on `device` and return a JSON-able record (see the module docstring).

    `batch_size`, `model_name` and `shape` default per device (CPU: 128, preact_small, 1x28x28; CUDA: 512,
    resnet18, 3x32x32), the precision to the profile's. The keyword-only sizes exist for quick smoke runs.
    """
    started = time.perf_counter()
    work, setup = workload_and_data(default_workload(torch.device(device), batch_size, model_name, shape),
                                    n_train, n_test, seed)
    log.info("bench: %s on %s, %s", work.model_name, work.device, work.dtype_name)
    timing = dict(seconds=seconds_per_case, min_calls=min_calls)
    training, trained = compare_training(work, setup, workers, steps_per_call, **timing)
    sizes = matmul_sizes or ((4096, 8192) if work.device.type == "cuda" else (2048, 3072, 4096))
    peak = matmul_peak(work.device, work.dtype, sizes)
    forward = forward_flops(trained, work.shape, work.device)
    flops = utilization(forward, training["train"]["images_per_s"], peak["flops_per_s"])
    if "train_other" in training:  # the other precision, against its own dtype's peak
        other = training["train_other"]["precision"]
        other_peak = matmul_peak(work.device, DTYPES[other], sizes)
        flops["other"] = {**utilization(forward, training["train_other"]["images_per_s"], other_peak["flops_per_s"]),
                          "precision": other, "peak": other_peak}
    pam = pam_overhead(work, setup.attacker_train, steps=max(1, steps_per_call // 4), **timing)
    evaluation = eval_throughput(work, trained, setup.bundle.test.images, **timing)
    lmc = lmc_scan(work, trained, work.model(seed=3), setup, lmc_points)
    data = {"n_train": len(setup.attacker_train), "n_test": len(setup.bundle.test),
            "n_triggered": len(setup.triggered_test), "synthetic": True}
    return {"environment": environment(work), **training, "peak": peak, "flops": flops, "pam": pam,
            "eval": evaluation, "lmc": lmc, "data": data, "seconds_per_case": seconds_per_case,
            "total_s": time.perf_counter() - started}


def other_precision(work: Workload) -> str | None:
    """The precision measured beside the profile's: bf16 where the hardware has it and the profile trains in fp32,
    fp32 where the profile trains in bf16."""
    if work.precision == "bf16":
        return "fp32"
    return "bf16" if native_bf16(work.device) else None


def compare_training(work: Workload, setup: Setup, workers: tuple[int, ...], steps: int, seconds: float,
                     min_calls: int) -> tuple[dict, nn.Module]:
    """Cases 1 and 2, interleaved: `fit` against the conventional pipeline per worker count (NCHW and fp32, as the
    usual toolkits train); the conventional pipeline with bdsafety's channels_last model (ablation); `fit` in the
    other precision; the pipelines alone."""
    steps = min(steps, len(setup.attacker_train) // work.batch_size)
    dataset = conventional_dataset(setup)
    fit_call, trained = fit_case(work, setup.attacker_train, steps)
    cases = {"bdsafety": fit_call, **{str(w): conventional_case(work, dataset, w, steps) for w in workers},
             "channels_last": conventional_case(work, dataset, workers[0], steps, torch.channels_last)}
    other = other_precision(work)
    if other:
        cases["bdsafety_other"] = fit_case(work, setup.attacker_train, steps, precision=other)[0]
    times = round_robin(cases, seconds, min_calls)
    summaries = {name: {**rate_summary(steps * work.batch_size, durations),
                        "step_ms": 1e3 * statistics.median(durations) / steps} for name, durations in times.items()}
    method = f"train.fit's own duration_s (epoch loop, ends in a host sync), {steps} steps per call; " + INTERLEAVED
    train = {**summaries.pop("bdsafety"), "precision": work.precision, "method": method}
    alternative = {"train_other": {**summaries.pop("bdsafety_other"), "precision": other, "method": method}} \
        if other else {}
    ablation = {**summaries.pop("channels_last"), "num_workers": workers[0], "memory_format": "channels_last"}
    conventional = {w: {**case, "num_workers": int(w), "method": f"perf_counter around {steps} steps (next(loader) + "
                        "step), persistent workers whose prefetched batches are drained untimed first; "
                        + INTERLEAVED} for w, case in summaries.items()}
    best = max(conventional.values(), key=lambda case: case["images_per_s"])
    baseline = times[str(best["num_workers"])]
    speedup = paired_speedup(baseline, times["bdsafety"])
    return {"train": train, "conventional": conventional,
            "conventional_best": {"num_workers": best["num_workers"], "images_per_s": best["images_per_s"]},
            "speedup": speedup["median"], "speedup_rounds": {**speedup, "method": SPEEDUP_METHOD},
            "conventional_channels_last": ablation,
            "speedup_same_memory_format": paired_speedup(times["channels_last"], times["bdsafety"])["median"],
            **alternative,
            **({"speedup_other": paired_speedup(baseline, times["bdsafety_other"])["median"]} if other else {}),
            "input_pipeline": input_pipelines(work, setup.attacker_train, dataset, seconds, min_calls)}, trained


def profile_train(device: torch.device, steps: int = 30, top: int = 15) -> list[dict]:
    """torch.profiler over `steps` steps of `train.fit` (after a warm-up call): the top ops by self CPU time."""
    work = default_workload(torch.device(device), None, None, None)
    work, setup = workload_and_data(work, n_train=2 * steps * work.batch_size, n_test=10)
    data = setup.attacker_train.subset(torch.arange(steps * work.batch_size)).to(work.device)
    config, model = work.train_config(), work.model(seed=1)
    fit(model, data, config, seed=0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fit(model, data, config, seed=1)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps, "share": e.self_cpu_time_total / total,
             "calls_per_step": e.count / steps} for e in events[:top]]
