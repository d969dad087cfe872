"""The one fast training loop (backdoor training, fine-tuning defenses, RA) and evaluation.

Data stays a pair of uint8 tensors on the device; each batch is indexed, converted to float and
augmented with batched tensor ops. Optimizers that need a closure (SAM, PAM) get one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import ImageSet, augment, to_float
from .errors import UsageError
from .metrics import attack_success_rate, clean_accuracy

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
PRECISIONS = ("fp32", "bf16", "auto")
SCHEDULES = ("cosine", "cosine_per_step", "constant")
BatchHook = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]
# channels_last is faster for the small ResNet on CPU (docs/speed.md, docs/calibration.md) and the fast path on GPUs.
MEMORY_FORMAT = torch.channels_last


@dataclass(frozen=True)
class TrainConfig:
    """SGD recipe; defaults are the paper's backdoor-training recipe (config `config/attack/prototype/cifar10.yaml`)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # "cosine": CosineAnnealingLR(T_max = epochs) stepped after each epoch; "cosine_per_step": CosineAnnealingLR
    # (T_max = cosine_t_max) stepped after each optimizer step, periodic once the steps pass T_max; "constant"
    schedule: str = "cosine"
    cosine_t_max: int | None = None  # "cosine_per_step" only: T_max in steps (None: all steps of the run)
    crop_pad: int = 4
    flip: bool = True
    drop_last: bool = True
    label_smoothing: float = 0.0
    # "bf16": forward and loss under bf16 autocast (weights, gradients and BN statistics stay fp32);
    # "auto": bf16 where the device multiplies bf16 natively (CUDA, or a CPU with AVX512-BF16/AMX), else fp32
    precision: str = "fp32"

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0:
            raise UsageError(f"training needs epochs >= 0, batch_size >= 1, lr >= 0; got {self}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        if self.cosine_t_max is not None and self.cosine_t_max < 1:
            raise UsageError(f"cosine_t_max must be >= 1 (or None), got {self.cosine_t_max}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")

    def to_json(self) -> dict:
        """The fields as plain data; `cosine_t_max` only when set, so earlier configs keep their stage keys."""
        data = asdict(self)
        if data["cosine_t_max"] is None:
            del data["cosine_t_max"]
        return data


def training_augmentation(config: "TrainConfig | dict") -> dict:
    """The crop/flip augmentation of a training recipe (a TrainConfig or its JSON record), which defenses
    and the Retuning Attack reuse: they fine-tune with the backdoored model's own training transform."""
    values = config.to_json() if isinstance(config, TrainConfig) else config
    return {"crop_pad": values["crop_pad"], "flip": values["flip"]}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return device


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def sgd(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def batch_indices(n: int, batch_size: int, gen: torch.Generator, drop_last: bool) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=gen)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    return lambda model, x, y: F.cross_entropy(model(x), y, label_smoothing=label_smoothing)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware (elsewhere bf16 autocast is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # oneDNN's own AVX512-BF16/AMX probe
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def with_precision(loss_fn: LossFn, precision: str, device: torch.device) -> LossFn:
    """`loss_fn` computed under bf16 autocast for precision "bf16" (backward follows the forward's dtypes)."""
    if precision == "fp32":
        return loss_fn

    def autocast_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return loss_fn(model, x, y)

    return autocast_loss


def fit(
    model: nn.Module,
    data: ImageSet,
    config: TrainConfig,
    seed: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
    batch_hook: BatchHook | None = None,
    after_step: Callable[[], None] | None = None,
    unaugmented: Tensor | None = None,
    progress: bool = False,
) -> dict:
    """Train `model` in place on `data` (uint8 images) with `config`. Returns a small history record.

    `unaugmented` (bool [N], optional) marks samples that enter every batch exactly as stored, without
    the crop/flip augmentation (the Retuning Attack's poisons: the official code loads them with the
    test transform).
    """
    device = model_device(model)
    batches = DeviceBatches(data.images.to(device), data.labels.to(device), config,
                            unaugmented.to(device) if unaugmented is not None else None, batch_hook)
    optimizer = optimizer or sgd(model, config)
    scheduler = make_scheduler(optimizer, config, batches.steps_per_epoch())
    per_step = config.schedule == "cosine_per_step"
    precision = resolve_precision(config.precision, device)
    loss_fn = with_precision(loss_fn or cross_entropy(config.label_smoothing), precision, device)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    history, started, steps = [], time.perf_counter(), 0
    # As the optimizer's own post-step hook, `after_step` (FST's projection, FP's mask) runs before torch's
    # global step hooks, so a defense's step snapshots (defenses/_trajectory.py) already include it.
    handle = optimizer.register_step_post_hook(lambda *_: after_step()) if after_step is not None else None
    try:
        for epoch in trange(config.epochs, progress):
            total, steps = torch.zeros((), device=device), 0
            for x, y in batches.epoch(gen):
                total += optimizer_step(model, optimizer, loss_fn, x, y).detach()
                steps += 1
                if per_step:
                    scheduler.step()
            if not per_step:
                scheduler.step()
            history.append(check_finite(float(total) / max(steps, 1), epoch))
    finally:
        if handle is not None:
            handle.remove()
    return {"epoch_losses": history, "duration_s": time.perf_counter() - started, "steps_per_epoch": steps,
            "precision": precision}


@dataclass
class DeviceBatches:
    """One epoch's shuffled, augmented batches of uint8 images held on the device (the training loop's input)."""

    images: Tensor
    labels: Tensor
    config: TrainConfig
    keep: Tensor | None = None  # rows that enter every batch exactly as stored
    hook: BatchHook | None = None  # changes each augmented batch (EP's triggers, BTI/PAM's inverted samples)

    def steps_per_epoch(self) -> int:
        n, size = len(self.labels), self.config.batch_size
        return n // size if self.config.drop_last and n >= size else math.ceil(n / size)

    def epoch(self, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        for idx in batch_indices(len(self.labels), self.config.batch_size, gen, self.config.drop_last):
            idx = idx.to(self.images.device)
            x = augmented_batch(to_float(self.images[idx]), self.config, gen,
                                self.keep[idx] if self.keep is not None else None)
            y = self.labels[idx]
            if self.hook is not None:
                x, y = self.hook(x, y, gen)
            yield x.contiguous(memory_format=MEMORY_FORMAT), y


def augmented_batch(x: Tensor, config: TrainConfig, gen: torch.Generator, keep: Tensor | None) -> Tensor:
    """The batch with the config's crop/flip; rows where `keep` is True stay exactly as given."""
    augmented = augment(x, config.crop_pad, config.flip, gen)
    return augmented if keep is None else torch.where(keep[:, None, None, None], x, augmented)


def optimizer_step(model: nn.Module, optimizer, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    if getattr(optimizer, "needs_closure", False):
        return optimizer.step(closure)
    loss = closure()
    optimizer.step()
    return loss


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int = 1):
    """The config's LR schedule; `steps_per_epoch` sizes the default T_max of "cosine_per_step"."""
    if config.schedule == "cosine" and config.epochs > 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "cosine_per_step":
        t_max = config.cosine_t_max or max(1, config.epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def check_finite(loss: float, epoch: int) -> float:
    if not math.isfinite(loss):
        raise UsageError(f"training diverged (loss {loss}) in epoch {epoch + 1}; lower the learning rate")
    return loss


def trange(n: int, progress: bool):
    if not progress:
        return range(n)
    from tqdm.auto import trange as tqdm_trange

    return tqdm_trange(n, desc="epochs", leave=False, disable=None)


def eval_batch_size(device: torch.device) -> int:
    """Inference batch: 256 on CPU, where it measured faster than 1024 (cache-sized activations, preact_small on
    2 cores; the numbers are in docs/calibration.md); 1024 on accelerators, which want large batches."""
    return 256 if device.type == "cpu" else 1024


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor, batch_size: int | None = None) -> Tensor:
    """Class predictions for uint8 images, in eval mode (the prior mode is restored)."""
    return torch.cat([logits.argmax(1) for logits in iter_logits(model, images, batch_size)]) if len(images) else \
        torch.empty(0, dtype=torch.int64)


def iter_logits(model: nn.Module, images: Tensor, batch_size: int | None = None) -> Iterator[Tensor]:
    device = model_device(model)
    batch_size = batch_size or eval_batch_size(device)
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = to_float(images[start:start + batch_size].to(device)).contiguous(memory_format=MEMORY_FORMAT)
            yield model(x).float()


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode inside the block; each one's prior train/eval mode is restored after."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def evaluate(model: nn.Module, test: ImageSet, triggered: ImageSet | None, target: int | None) -> dict:
    """C-Acc on the whole clean test set and ASR on the triggered test set (Min et al., Table 1): the share of triggered
    images given their attack label (all-to-one: the target; all-to-all: each image's own), as `triggered` holds it."""
    metrics = {"clean_acc": clean_accuracy(predict(model, test.images).cpu(), test.labels.cpu())}
    if triggered is not None and target is not None:
        metrics["asr"] = attack_success_rate(predict(model, triggered.images).cpu(), triggered.labels.cpu())
    return metrics


@dataclass(frozen=True)
class EvalSets:
    """What a model is measured on: the clean and the triggered test set and, where the run holds one out,
    the calibration split (clean and triggered) on which settings are chosen (never the test set)."""

    test: ImageSet
    triggered_test: ImageSet | None
    target: int | None
    calibration: ImageSet | None = None
    triggered_calibration: ImageSet | None = None
    label_policy: str = "all2one"  # how the triggered sets are labelled: "all2one" (the target) or "all2all"

    def evaluate(self, model: nn.Module) -> dict:
        """Test-set C-Acc and ASR, and the same on the calibration split as `calibration_*`."""
        metrics = evaluate(model, self.test, self.triggered_test, self.target)
        if self.calibration is not None:
            calibration = evaluate(model, self.calibration, self.triggered_calibration, self.target)
            metrics.update({f"calibration_{k}": v for k, v in calibration.items()})
        return metrics

    def evaluate_test(self, model: nn.Module) -> dict:
        return evaluate(model, self.test, self.triggered_test, self.target)

    def with_test_sample(self, count: int) -> "EvalSets":
        """A fixed random `count` of the clean and of the triggered test images (`ImageSet.fixed_sample`; 0: all)."""
        if not count:
            return self
        triggered = self.triggered_test.fixed_sample(count) if self.triggered_test is not None else None
        return replace(self, test=self.test.fixed_sample(count), triggered_test=triggered)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> None:
    """Reset every BN layer's running statistics and set them to the exact sample-weighted average over
    `batches` (input images, in train mode; Garipov's `update_bn`); the model's prior mode is restored."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    momenta, mode, seen = [bn.momentum for bn in layers], model.training, 0
    for bn in layers:
        bn.reset_running_stats()
    model.train()
    try:
        for x in batches:
            for bn in layers:
                bn.momentum = len(x) / (seen + len(x))  # running = seen/(seen+b)·running + b/(seen+b)·batch
            model(x)
            seen += len(x)
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        model.train(mode)
