"""What every attack shares: the Attack contract and the one generic poisoning function.

Attack contract (`Attack`, with the defaults of `AttackBase`): a frozen dataclass whose fields are its
parameters, registered with `@ATTACKS.register(name)`, with

    apply(images) -> images        the test trigger: float [0,1] NCHW to the same shape, purely and
                                   deterministically (trigger randomness comes from the attack's own seed)
    apply_train(images) -> images  the training-time trigger (default: `apply`; LC differs)
    clean_label                    whether poisoned samples keep their labels (drawn from the target class)
    cross_ratio, apply_noise       noise-mode samples per poisoned sample (WaNet), warped with random
                                   noise and label kept; 0 for other attacks
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from ..data import ImageSet, to_float, to_uint8
from ..errors import UsageError
from ..registry import Registry

ATTACKS = Registry("attack")

CHUNK = 4096
# How a poisoned sample is relabelled: every one to the target (all-to-one), or class y to (y + 1) mod C
# (all-to-all, BackdoorBench's `attack_label_trans: all2all`).
LABEL_POLICIES = ("all2one", "all2all")


def attack_labels(labels: Tensor, target: int, num_classes: int, policy: str = "all2one") -> Tensor:
    """The label the backdoor should give each image of true class `labels`: the target, or (y + 1) mod C."""
    if policy == "all2all":
        return (labels + 1) % num_classes
    if policy != "all2one":
        raise UsageError(f"label policy must be one of {', '.join(LABEL_POLICIES)}, got {policy!r}")
    return torch.full_like(labels, target)


class Attack(Protocol):
    clean_label: bool
    cross_ratio: float

    def apply(self, images: Tensor) -> Tensor: ...

    def apply_train(self, images: Tensor) -> Tensor: ...

    def apply_noise(self, images: Tensor, gen: torch.Generator) -> Tensor: ...


class AttackBase:
    """Defaults of the attack contract (mixed into each attack dataclass)."""

    clean_label = False
    cross_ratio = 0.0

    def apply(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def apply_train(self, images: Tensor) -> Tensor:
        return self.apply(images)

    def apply_noise(self, images: Tensor, gen: torch.Generator) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no noise mode (cross_ratio 0)")


@dataclass(frozen=True)
class PoisonedSet:
    """The attacker's training set: poisoned samples replace their clean originals.

    `cross_mask` marks WaNet noise-mode samples (warped with random noise, labels kept).
    """

    data: ImageSet
    poison_mask: Tensor
    cross_mask: Tensor

    @property
    def poison_indices(self) -> Tensor:
        return self.poison_mask.nonzero().flatten()


def map_uint8(fn: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Apply a float-space image function to uint8 images in chunks, quantising back to uint8."""
    out = torch.empty_like(images)
    for start in range(0, len(images), CHUNK):
        out[start:start + CHUNK] = to_uint8(fn(to_float(images[start:start + CHUNK])))
    return out


def check_rate_and_target(rate: float, target: int, num_classes: int) -> None:
    if not 0 < rate < 1:
        raise UsageError(f"poison rate must be in (0, 1), got {rate}")
    if not 0 <= target < num_classes:
        raise UsageError(f"target class must be in 0..{num_classes - 1}, got {target}")


def poison_count(num_samples: int, rate: float) -> int:
    return max(1, round(rate * num_samples))


def check_clean_label_rate(labels: Tensor, rate: float, target: int) -> None:
    """A clean-label rate is a share of the whole set drawn from the target class only: it cannot exceed that class's share."""
    available = int((labels == target).sum())
    if poison_count(len(labels), rate) > available:
        raise UsageError(
            f"clean-label poison rate {rate} needs {poison_count(len(labels), rate)} target-class images but class "
            f"{target} has {available}; use a rate <= {available / len(labels):.4f}"
        )


def choose_poison_indices(labels: Tensor, attack: Attack, rate: float, target: int, seed: int) -> Tensor:
    """round(rate*N) indices: from all samples (dirty-label) or from the target class (clean-label)."""
    n_poison = poison_count(len(labels), rate)
    if attack.clean_label:
        check_clean_label_rate(labels, rate, target)
    candidates = (labels == target).nonzero().flatten() if attack.clean_label else torch.arange(len(labels))
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return candidates[order[:n_poison]].sort().values


def check_poisoning(labels: Tensor, clean_label: bool, rate: float, target: int, num_classes: int,
                    policy: str = "all2one") -> None:
    """Every check `poison` makes before it changes anything (run early, before an expensive attack fit)."""
    check_rate_and_target(rate, target, num_classes)
    if policy not in LABEL_POLICIES:
        raise UsageError(f"label policy must be one of {', '.join(LABEL_POLICIES)}, got {policy!r}")
    if clean_label and policy != "all2one":
        raise UsageError("a clean-label attack keeps its poisons' labels, so it is all-to-one only; "
                         "use labels: all2one")
    if clean_label:
        check_clean_label_rate(labels, rate, target)


def poison(train: ImageSet, attack: Attack, rate: float, target: int, num_classes: int, seed: int,
           policy: str = "all2one") -> PoisonedSet:
    """Poison `train` with `attack`, relabelled by `policy` (all2one to `target`, or all2all), deterministically
    for `seed`."""
    check_poisoning(train.labels, attack.clean_label, rate, target, num_classes, policy)
    indices = choose_poison_indices(train.labels, attack, rate, target, seed)
    images, labels = train.images.clone(), train.labels.clone()
    images[indices] = map_uint8(attack.apply_train, images[indices])
    labels[indices] = attack_labels(labels[indices], target, num_classes, policy)
    poison_mask = torch.zeros(len(labels), dtype=torch.bool)
    poison_mask[indices] = True
    cross_mask = torch.zeros_like(poison_mask)
    if attack.cross_ratio:
        cross = choose_cross_indices(poison_mask, round(attack.cross_ratio * len(indices)), seed)
        gen = torch.Generator().manual_seed(seed + 1)
        images[cross] = map_uint8(lambda x: attack.apply_noise(x, gen), images[cross])
        cross_mask[cross] = True
    return PoisonedSet(ImageSet(images, labels), poison_mask, cross_mask)


def choose_cross_indices(poison_mask: Tensor, count: int, seed: int) -> Tensor:
    free = (~poison_mask).nonzero().flatten()
    order = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed + 2))
    return free[order[:count]]


def triggered_test_set(test: ImageSet, attack: Attack, target: int, num_classes: int | None = None,
                       policy: str = "all2one") -> ImageSet:
    """The ASR set: the test trigger on every test image whose attack label differs from its true label (all2one:
    the non-target images; all2all: all), labelled with that attack label (`num_classes` is needed for all2all)."""
    if policy == "all2all" and num_classes is None:
        raise UsageError("an all-to-all triggered set needs num_classes")
    wanted = attack_labels(test.labels, target, num_classes or target + 1, policy)
    keep = (wanted != test.labels).nonzero().flatten()
    return ImageSet(map_uint8(attack.apply, test.images[keep]), wanted[keep].to(torch.int64))


def check_numeric_fields(attack) -> None:
    """A one-line UsageError for an int/float parameter given as something else (e.g. `--set epochs=ten`)."""
    for f in dataclasses.fields(attack):
        value = getattr(attack, f.name)
        if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"{type(attack).__name__.lower()} parameter {f.name} must be a number, got {value!r}")
        if f.type == "int" and isinstance(value, float) and not value.is_integer():
            raise UsageError(f"{type(attack).__name__.lower()} parameter {f.name} must be an integer, got {value!r}")


def resize_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """Nearest-neighbour resize of a [h, w] mask defined on 32x32 (the papers' resolution)."""
    resized = torch.nn.functional.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")
    return resized[0, 0]


def psnr(clean: Tensor, encoded: Tensor) -> Tensor:
    """Per-image PSNR in dB for images in [0,1] (identical images give +inf)."""
    mse = (encoded - clean).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def distortion(clean: Tensor, poisoned: Tensor) -> dict[str, float]:
    """Mean PSNR (dB, capped at 100) and max / mean L-inf (pixel units) of uint8 poisons against their originals."""
    x, x_poisoned = to_float(clean), to_float(poisoned)
    linf = (x_poisoned - x).abs().flatten(1).amax(1).double()
    return {"psnr_mean": float(psnr(x, x_poisoned).clamp(max=100).mean()), "linf_max": float(linf.max()),
            "linf_mean": float(linf.mean())}
