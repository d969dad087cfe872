"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), as BackdoorBench's attack/inputaware.py runs it.

A pattern generator G and a mask generator M (small encoder-decoders) give every image its own trigger,
x' = (1 - m) x + m G(x) with m = threshold(M(x)). The attack is not data poisoning: the victim classifier
is trained jointly with G, so the poisoned model comes out of the attack's own fit.

1. M alone, `mask_epochs` (BackdoorBench's clean_train_epochs 25): Adam, loss λ_norm·mean(relu(m - density))
   + λ_div·mean(‖x1 - x2‖ / ‖m1 - m2‖) over pairs of images (the diversity loss: different images, different
   masks).
2. M frozen; the classifier (SGD) and G (Adam) for `epochs`. In each batch a `poison_rate` share is
   triggered with its own pattern and labelled with the target, as many again are "cross" samples, triggered
   with the pattern and mask of another image and keeping their label (so that a trigger works only on the
   image it was made for), the rest stay clean; loss CE + λ_div·diversity of G's patterns.

Distances and generator inputs are in the dataset's normalised space, as in BackdoorBench. The fit caches
G, M and the victim's weights; the train stage takes the victim from there (`trained_victim`), and
`apply` triggers any image with the fitted generators (the poisons RA uses are made the same way).
Choices: BackdoorBench's random rotation (10°) is not applied (crop and flip are, batched); the
generators follow BackdoorBench's MNIST layout (16 channels, 2 steps) for 1-channel images, else 32
channels and 3 steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageSet, augment, to_float
from ..errors import UsageError
from ..models import ModelSpec, create_model
from ._assets import attach, fitted_state, prefixed, stat_tensors, unprefixed
from ._common import ATTACKS, CHUNK, AttackBase, check_numeric_fields, distortion, map_uint8

log = logging.getLogger(__name__)

EPSILON = 1e-7  # BackdoorBench's EPSILON: keeps the diversity ratio finite


def conv_block(in_channels: int, out_channels: int, relu: bool = True) -> nn.Sequential:
    """BackdoorBench's Conv2dBlock: 3x3 conv, BN (momentum 0.05), ReLU."""
    layers = [nn.Conv2d(in_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels, momentum=0.05)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class TriggerGenerator(nn.Sequential):
    """BackdoorBench's InputAwareGenerator: `steps` x (two conv blocks, 2x2 max-pool), a middle block, then
    `steps` x (bilinear 2x upsampling, two conv blocks, the last without ReLU); output tanh/2 + 1/2."""

    def __init__(self, in_channels: int, out_channels: int, width: int, steps: int):
        layers, current, following = [], in_channels, width
        for step in range(steps):
            layers += [conv_block(current, following), conv_block(following, following), nn.MaxPool2d(2)]
            if step < steps - 1:
                current, following = following, following * 2
        layers.append(conv_block(following, following))
        current, following = following, following // 2
        for step in range(steps):
            last = step == steps - 1
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), conv_block(current, current),
                       conv_block(current, following, relu=not last)]
            current, following = following, following // 2
            if step == steps - 2:
                following = out_channels
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(super().forward(x)) / (2 + EPSILON) + 0.5


def threshold(mask_logits: Tensor) -> Tensor:
    """BackdoorBench's Threshold: a steep sigmoid-like map of M's output into (0, 1)."""
    return torch.tanh(mask_logits * 20 - 10) / (2 + EPSILON) + 0.5


def generator_layout(in_channels: int) -> tuple[int, int]:
    """(width, steps): BackdoorBench's MNIST layout for 1-channel images (28x28 halves only twice), else CIFAR's."""
    return (16, 2) if in_channels == 1 else (32, 3)


def diversity(inputs1: Tensor, inputs2: Tensor, out1: Tensor, out2: Tensor) -> Tensor:
    """mean over pairs of ‖x1 - x2‖ / ‖g1 - g2‖ (root-mean-square distances): low when different inputs get
    different outputs."""
    def rms(a: Tensor, b: Tensor) -> Tensor:
        return (a - b).pow(2).mean((1, 2, 3)).sqrt()

    return (rms(inputs1, inputs2) / (rms(out1, out2) + EPSILON)).mean()


@dataclass
class Nets:
    """The fitted generators and the normalisation they read their input in."""

    pattern: TriggerGenerator
    mask: TriggerGenerator
    mean: Tensor
    std: Tensor

    def normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pattern in pixel space, mask) for float [0, 1] images `x`."""
        z = self.normalise(x)
        return self.pattern(z), threshold(self.mask(z))

    def to(self, device: torch.device) -> "Nets":
        self.pattern.to(device)
        self.mask.to(device)
        return self


def in_batch_count(rate: float, batch_size: int, gen: torch.Generator) -> int:
    """Poisoned samples in one batch: rate x batch size, or, when that is below one, one sample with that
    probability (BackdoorBench's generalize_to_lower_pratio)."""
    expected = rate * batch_size
    return int(expected) if expected >= 1 else int(float(torch.rand(1, generator=gen)) < expected)


def blend(x: Tensor, pattern: Tensor, mask: Tensor) -> Tensor:
    return x + (pattern - x) * mask


@ATTACKS.register("input_aware")
@dataclass(frozen=True)
class InputAware(AttackBase):
    """Input-aware dynamic backdoor: a per-image trigger from generators trained jointly with the victim."""

    display_name: ClassVar[str] = "Input-Aware"  # in tables and figures

    victim_model: str = "resnet18"  # the run's model: the victim is trained here (paper profile: resnet18)
    poison_rate: float = 0.1  # pratio [config/attack/inputaware/default.yaml]; set from the spec's rate
    # the victim's input normalisation and class count: the dataset's, set by the pipeline (None: from the images)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    epochs: int = 100  # BackdoorBench's attack training length (config/attack/prototype/cifar10.yaml)
    mask_epochs: int = 25  # clean_train_epochs [default.yaml]
    lr_classifier: float = 0.01  # lr_C [default.yaml]; SGD momentum 0.9, weight decay 5e-4
    lr_generator: float = 0.01  # lr_G [default.yaml]; Adam betas (0.5, 0.9)
    lr_mask: float = 0.01  # lr_M [default.yaml]; Adam betas (0.5, 0.9)
    classifier_milestones: tuple[int, ...] = (100, 200, 300, 400)  # schedulerC_milestones, x0.1 [default.yaml]
    generator_milestones: tuple[int, ...] = (200, 300, 400, 500)  # schedulerG_milestones, x0.1
    mask_milestones: tuple[int, ...] = (10, 20)  # schedulerM_milestones, x0.1
    lambda_div: float = 1.0  # [default.yaml]
    lambda_norm: float = 100.0  # [default.yaml]
    mask_density: float = 0.032  # [default.yaml]
    batch_size: int = 128  # BackdoorBench's batch size
    crop_pad: int = 5  # random_crop 5 [default.yaml]
    flip: bool = True  # CIFAR-10's horizontal flip (BackdoorBench's PostTensorTransform)
    seed: int = 0
    name: ClassVar[str] = "input_aware"
    cpu_overrides: ClassVar[dict] = {"victim_model": "preact_small", "epochs": 8, "mask_epochs": 5, "crop_pad": 2}
    trains_victim: ClassVar[bool] = True

    def __post_init__(self):
        check_numeric_fields(self)
        if not 0 < self.poison_rate <= 0.5 or self.epochs < 0 or self.mask_epochs < 0 or self.batch_size < 2:
            raise UsageError(f"input_aware needs poison_rate in (0, 0.5], epochs >= 0, mask_epochs >= 0 and "
                             f"batch_size >= 2; got {self}")

    def check_model(self, model_name: str) -> None:
        """The run's model must be the victim this attack trains."""
        if model_name != self.victim_model:
            raise UsageError(f"input_aware trains its victim itself (victim_model '{self.victim_model}') but the "
                             f"run's model is '{model_name}'; set the attack parameter victim_model={model_name}")

    def apply(self, images: Tensor) -> Tensor:
        nets: Nets = fitted_state(self)["nets"]
        nets.to(images.device)
        with torch.no_grad():
            return torch.cat([blend(x, *nets.parts(x)) for x in images.split(CHUNK)]).clamp(0, 1)

    def trained_victim(self, spec: ModelSpec) -> tuple[nn.Module, dict]:
        """The victim trained with the generators (eval mode, CPU) and the fit's training record."""
        self.check_model(spec.name)
        state = fitted_state(self)
        model = create_model(spec)
        model.load_state_dict(state["victim"])
        return model.eval(), state["history"]

    def fit_assets(self, train: ImageSet, target: int, device: torch.device) -> dict[str, Tensor]:
        """Train M, then the victim and G together; their weights, the normalisation and the statistics."""
        gen = torch.Generator().manual_seed(self.seed)
        spec = self.victim_spec(train)
        mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
        channels = spec.in_channels
        width, steps = generator_layout(channels)
        torch.manual_seed(self.seed)
        nets = Nets(TriggerGenerator(channels, channels, width, steps), TriggerGenerator(channels, 1, width, steps),
                    mean, std).to(device)
        victim = create_model(spec).to(device)
        images, labels = train.images.to(device), train.labels.to(device)
        started = time.perf_counter()
        mask_losses = self.train_mask(nets, images, gen)
        mask_s = time.perf_counter() - started
        losses = self.train_jointly(victim, nets, images, labels, target, gen)
        joint_s = time.perf_counter() - started - mask_s
        nets.pattern.eval(), nets.mask.eval(), victim.eval()
        measure = {"mask_s": mask_s, "joint_s": joint_s, **self.measure(nets, victim, train, target)}
        log.info("input_aware: %s", ", ".join(f"{k} {v:.4f}" for k, v in measure.items()))
        return {**prefixed("pattern", nets.pattern.state_dict()), **prefixed("mask", nets.mask.state_dict()),
                **prefixed("victim", victim.state_dict()), "norm.mean": mean.cpu(), "norm.std": std.cpu(),
                "history.mask_losses": torch.tensor(mask_losses, dtype=torch.float64),
                "history.epoch_losses": torch.tensor(losses, dtype=torch.float64), **stat_tensors(measure)}

    def victim_spec(self, train: ImageSet) -> ModelSpec:
        """The victim's architecture, with the dataset's normalisation (else the training images' own)."""
        x = to_float(train.images[:10000])
        mean = self.mean or tuple(float(v) for v in x.mean((0, 2, 3)))
        std = self.std or tuple(float(v) for v in x.std((0, 2, 3)).clamp(min=1e-3))
        classes = self.num_classes or int(train.labels.max()) + 1
        return ModelSpec(self.victim_model, train.images.shape[1], classes, tuple(mean), tuple(std))

    def pairs(self, n: int, gen: torch.Generator):
        """Index pairs of one epoch: two independent shuffles, as BackdoorBench's two loaders (last batch dropped)."""
        first, second = torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)
        for start in range(0, n - self.batch_size + 1, self.batch_size):
            yield first[start:start + self.batch_size], second[start:start + self.batch_size]

    def augmented(self, images: Tensor, gen: torch.Generator) -> Tensor:
        aug_gen = torch.Generator(device=images.device).manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
        return augment(to_float(images), self.crop_pad, self.flip, aug_gen)

    def train_mask(self, nets: Nets, images: Tensor, gen: torch.Generator) -> list[float]:
        optimizer = torch.optim.Adam(nets.mask.parameters(), self.lr_mask, betas=(0.5, 0.9))
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(self.mask_milestones), 0.1)
        nets.mask.train()
        losses = []
        for _ in range(self.mask_epochs):
            total, count = 0.0, 0
            for first, second in self.pairs(len(images), gen):
                x1 = nets.normalise(self.augmented(images[first], gen))
                x2 = nets.normalise(self.augmented(images[second], gen))
                m1, m2 = threshold(nets.mask(x1)), threshold(nets.mask(x2))
                loss = (self.lambda_norm * F.relu(m1 - self.mask_density).mean()
                        + self.lambda_div * diversity(x1, x2, m1, m2))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + float(loss.detach()), count + 1
            schedule.step()
            losses.append(total / max(count, 1))
        nets.mask.eval().requires_grad_(False)
        return losses

    def train_jointly(self, victim: nn.Module, nets: Nets, images: Tensor, labels: Tensor, target: int,
                      gen: torch.Generator) -> list[float]:
        optimizer_c = torch.optim.SGD(victim.parameters(), self.lr_classifier, momentum=0.9, weight_decay=5e-4)
        optimizer_g = torch.optim.Adam(nets.pattern.parameters(), self.lr_generator, betas=(0.5, 0.9))
        schedules = [torch.optim.lr_scheduler.MultiStepLR(optimizer_c, list(self.classifier_milestones), 0.1),
                     torch.optim.lr_scheduler.MultiStepLR(optimizer_g, list(self.generator_milestones), 0.1)]
        losses = []
        for _ in range(self.epochs):
            victim.train(), nets.pattern.train()
            total, count = 0.0, 0
            for first, second in self.pairs(len(images), gen):
                poisoned = in_batch_count(self.poison_rate, self.batch_size, gen)
                x1, x2 = self.augmented(images[first], gen), self.augmented(images[second], gen)
                y1 = labels[first]
                with torch.no_grad():
                    masks = threshold(nets.mask(nets.normalise(x1[:poisoned])))
                    cross_masks = threshold(nets.mask(nets.normalise(x2[poisoned:2 * poisoned])))
                patterns = nets.pattern(nets.normalise(x1[:poisoned]))
                cross_patterns = nets.pattern(nets.normalise(x2[poisoned:2 * poisoned]))
                triggered = blend(x1[:poisoned], patterns, masks)
                crossed = blend(x1[poisoned:2 * poisoned], cross_patterns, cross_masks)
                inputs = torch.cat([triggered, crossed, x1[2 * poisoned:]])
                targets = torch.cat([torch.full_like(y1[:poisoned], target), y1[poisoned:]])
                loss = F.cross_entropy(victim(inputs), targets)
                if poisoned:
                    loss = loss + self.lambda_div * diversity(
                        nets.normalise(x1[:poisoned]), nets.normalise(x2[poisoned:2 * poisoned]),
                        nets.normalise(patterns), nets.normalise(cross_patterns))
                optimizer_c.zero_grad(set_to_none=True)
                optimizer_g.zero_grad(set_to_none=True)
                loss.backward()
                optimizer_c.step()
                optimizer_g.step()
                total, count = total + float(loss.detach()), count + 1
            for schedule in schedules:
                schedule.step()
            losses.append(total / max(count, 1))
        return losses

    @torch.no_grad()
    def measure(self, nets: Nets, victim: nn.Module, train: ImageSet, target: int) -> dict[str, float]:
        """Trigger distortion, and on training images the victim's accuracy, its target rate on triggered
        non-target images and on cross-triggered ones (another image's trigger: should stay low)."""
        device = next(victim.parameters()).device
        pool = train.images[train.labels != target][:2000]
        x = to_float(pool.to(device))
        patterns, masks = nets.parts(x)
        crossed = blend(x, patterns.roll(1, 0), masks.roll(1, 0))
        clean = to_float(train.images[:2000].to(device))
        return {**distortion(pool, map_uint8(lambda b: blend(b, *nets.parts(b)).clamp(0, 1), pool.to(device)).cpu()),
                "mask_mean": float(masks.mean()),
                "train_clean_acc": float((victim(clean).argmax(1).cpu() == train.labels[:2000]).float().mean()),
                "train_asr": float((victim(blend(x, patterns, masks)).argmax(1) == target).float().mean()),
                "train_cross_target_rate": float((victim(crossed).argmax(1) == target).float().mean())}

    def with_assets(self, assets: dict[str, Tensor], target: int) -> "InputAware":
        channels = assets["pattern.0.0.weight"].shape[1]
        width, steps = generator_layout(channels)
        nets = Nets(TriggerGenerator(channels, channels, width, steps), TriggerGenerator(channels, 1, width, steps),
                    assets["norm.mean"].float(), assets["norm.std"].float())
        nets.pattern.load_state_dict(unprefixed("pattern", assets))
        nets.mask.load_state_dict(unprefixed("mask", assets))
        nets.pattern.eval().requires_grad_(False), nets.mask.eval().requires_grad_(False)
        history = {"mask_losses": assets["history.mask_losses"].tolist(),
                   "epoch_losses": assets["history.epoch_losses"].tolist(),
                   "duration_s": float(assets["stat.mask_s"] + assets["stat.joint_s"])}
        return attach(self, {"nets": nets, "victim": unprefixed("victim", assets), "history": history})
