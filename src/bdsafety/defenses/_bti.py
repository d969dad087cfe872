"""Backdoor trigger inversion shared by BTI-DBF(U) and PAM (official `fine_tune/BTIDBF/pretrain.py`, `btidbfu.py`).

BTI-DBF: Xu et al., "Towards Reliable and Efficient Backdoor Trigger Inversion via Decoupling Benign
Features", ICLR 2024. A U-Net generator G is pre-trained to be the identity in the classifier's
prediction and feature space (stage A). Each round then learns a mask that keeps the benign part of
the feature map (B1), trains G to change only the backdoor part of the features (B2), detects the
target class from G's outputs (B3, first round), and hands G to the defense's unlearning step (B4).

Image spaces. bdsafety images are float [0, 1] pixels and models normalise internally. As in the
official code, the U-Net itself acts on *normalised* images and its output is unbounded (never
clamped); `TriggerGenerator` wraps it as pixels -> normalise -> U-Net -> denormalise -> pixels, so
its output goes straight into the model (which normalises it back to the U-Net's output exactly).
Every image loss (`norm_bound`, stage A's image term) is measured in normalised space, the space the
official bounds were set in.

The official code (`fine_tune/BTIDBF/cifar.py`) draws an unseeded 2,500-image subset per loader; here every
stage uses the defender's seeded reserve split (a bdsafety decision, docs/methods/defenses.md), and the
generator only ever sees that data.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageSet, augment, seed_for, to_float
from ..train import batch_indices, eval_mode, model_device
from ._common import DefenderData, DefenseBase

log = logging.getLogger(__name__)

# Unlearning step of a defense: (round, generator, seed) -> {"epoch_losses": [...], "steps": int}.
Unlearn = Callable[[int, "TriggerGenerator", int], dict]


# ---------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------

def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x [3x3 conv -> InstanceNorm(affine) -> LeakyReLU], the U-Net's encoder/decoder block."""
    layers = []
    for c_in in (in_channels, out_channels):
        layers += [nn.Conv2d(c_in, out_channels, 3, padding=1), nn.InstanceNorm2d(out_channels, affine=True),
                   nn.LeakyReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """BTI-DBF's U-Net: 4 encoder blocks (base, 2b, 4b, 8b) with 2x2 max-pool, a 16b bottleneck,
    4 decoder blocks (3x3 stride-2 transposed conv -> LeakyReLU -> concat skip -> block), 1x1 output conv.

    Needs H and W divisible by 16 and at least 32 (InstanceNorm needs > 1 spatial element at the
    bottleneck); `TriggerGenerator` pads to that and crops back.
    """

    def __init__(self, channels: int, base: int = 32):
        super().__init__()
        widths = [base, 2 * base, 4 * base, 8 * base]
        self.encoders = nn.ModuleList(conv_block(c_in, c_out) for c_in, c_out in zip([channels] + widths, widths))
        self.bottleneck = conv_block(widths[-1], 16 * base)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(2 * w, w, 3, stride=2, padding=1, output_padding=1) for w in reversed(widths))
        self.decoders = nn.ModuleList(conv_block(2 * w, w) for w in reversed(widths))
        self.out = nn.Conv2d(base, channels, 1)

    def forward(self, z: Tensor) -> Tensor:
        skips = []
        for encoder in self.encoders:
            z = encoder(z)
            skips.append(z)
            z = F.max_pool2d(z, 2)
        z = self.bottleneck(z)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            z = decoder(torch.cat([F.leaky_relu(up(z)), skip], dim=1))
        return self.out(z)


def padded_size(size: int) -> int:
    """Smallest multiple of 16 that is >= max(size, 32): 28 -> 32, 32 -> 32, 64 -> 64, 16 -> 32."""
    return max(32, 16 * math.ceil(size / 16))


class TriggerGenerator(nn.Module):
    """G: float [0,1] pixel images [N,C,H,W] -> generated images, same shape, pixel scale, unbounded.

    The U-Net runs on normalised images (the model's own mean/std), as in the official code. Inputs
    whose sides are not a multiple of 16 (28x28) are reflect-padded symmetrically and cropped back.
    """

    def __init__(self, channels: int, mean: Tensor, std: Tensor, base: int = 32):
        super().__init__()
        self.unet = UNet(channels, base)
        self.register_buffer("mean", mean.detach().clone().view(1, -1, 1, 1))
        self.register_buffer("std", std.detach().clone().view(1, -1, 1, 1))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def from_normalized(self, z: Tensor) -> Tensor:
        """Run the U-Net on normalised images and return pixel-scale images."""
        h, w = z.shape[-2:]
        pad_h, pad_w = padded_size(h) - h, padded_size(w) - w
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        out = self.unet(F.pad(z, pads, mode="reflect") if any(pads) else z)
        out = out[..., pads[2]:pads[2] + h, pads[0]:pads[0] + w]
        return out * self.std + self.mean

    def forward(self, x: Tensor) -> Tensor:
        return self.from_normalized(self.normalize(x))

    def image_loss(self, x: Tensor, generated: Tensor) -> Tensor:
        """MSE between input and generated images in normalised space (where the bounds are defined)."""
        return F.mse_loss((generated - self.mean) / self.std, self.normalize(x))


def create_generator(model: nn.Module, channels: int, seed: int, base: int = 32) -> TriggerGenerator:
    """A freshly initialised G (U-Net base width `base`) on the model's device, using the model's normalisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = TriggerGenerator(channels, model.normalize.mean, model.normalize.std, base)
    return generator.to(model_device(model))


def generated(generator: TriggerGenerator) -> Callable[[Tensor], Tensor]:
    """x -> G(x) with G in eval mode, without gradients, in the batch's dtype: the images B4 mixes into its
    batches with their TRUE labels (B4, as `unlearn` in the official `fine_tune/BTIDBF/btidbfu.py`;
    `_tuning.replace_fraction` picks k = int(ratio*|B| + 1))."""

    @torch.no_grad()
    def transform(x: Tensor) -> Tensor:
        with eval_mode(generator):
            return generator(x).to(x.dtype)

    return transform


# ---------------------------------------------------------------------------------------------------
# Loss terms (pure tensor math)
# ---------------------------------------------------------------------------------------------------

def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean of -sum(target * log_softmax(logits)), i.e. F.cross_entropy with probability targets."""
    return F.cross_entropy(logits, target_probs)


def pretrain_loss(logits_x: Tensor, logits_p: Tensor, feats_x: Tensor, feats_p: Tensor, image_mse: Tensor) -> Tensor:
    """Stage A loss: G(x) must look like x to the classifier.

    The prediction term applies cross-entropy to softmax *outputs* as if they were logits (a double
    softmax). This is a quirk of the official `fine_tune/BTIDBF/pretrain.py`, kept for fidelity: it only weakens
    that term.
    """
    pred = soft_cross_entropy(logits_x.softmax(1), logits_p.softmax(1))
    image_weight = 100.0 if float(image_mse.detach()) > 0.1 else 0.01
    return pred + F.mse_loss(feats_p, feats_x) + image_weight * image_mse


def mask_from_logits(mask_logits: Tensor) -> Tensor:
    """m = tanh(M0) / (2 + 1e-7) + 0.5, in (0, 1)."""
    return torch.tanh(mask_logits) / (2 + 1e-7) + 0.5


def mask_loss(head: Callable[[Tensor], Tensor], feats: Tensor, mask: Tensor, y: Tensor) -> Tensor:
    """B1: the masked features must classify well and their complement badly."""
    return F.cross_entropy(head(mask * feats), y) - F.cross_entropy(head((1 - mask) * feats), y)


def generator_loss(feats_x: Tensor, feats_g: Tensor, mask: Tensor, image_mse: Tensor,
                   norm_bound: float, feat_bound: float) -> Tensor:
    """B2: change the backdoor (1-m) features while keeping benign (m) features and the image close.

    Outside the bounds only the image term is minimised, pulling G back toward the identity.
    """
    benign = F.mse_loss(mask * feats_g, mask * feats_x)
    if float(image_mse.detach()) > norm_bound or float(benign.detach()) > feat_bound:
        return image_mse
    backdoor = F.mse_loss((1 - mask) * feats_g, (1 - mask) * feats_x)
    return -backdoor + 0.01 * benign


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------

# BTI-DBF(U) and PAM on Fashion-MNIST, 2 cores. The CPU profile cuts the inversion's and the unlearning's lengths
# and keeps the official U-Net width (32, hard-coded in btidbfu.py): the width is the generator's capacity, so
# narrowing it changes what the inversion can find, not only how long it takes. The lengths are the strength rule's
# weakest purifying point on the calibration split (docs/calibration.md gives the grid and the narrower widths tried).
# `defense_params` sets the paper's lengths (50/20/30 generator epochs, 3 rounds of 30 unlearning epochs).
CPU_OVERRIDES = {"preround": 5, "mround": 20, "uround": 5, "nround": 2, "ul_round": 5}


@dataclass(frozen=True)
class BTIStages(DefenseBase):
    """The trigger-inversion hyperparameters shared by BTI-DBF(U) and PAM (the paper's official defaults).

    Sources, all in the official `fine_tune/BTIDBF/`: "argparse default of cfg.py" is a default of the parser in
    `cfg.py` (which `pretrain.py` and `btidbfu.py` use); "defense.sh" is the repository's shell script
    `defense.sh`, whose commands override those defaults; "hard-coded" names the file that holds the constant.
    """

    preround: int = 50  # stage A epochs: argparse default of cfg.py, read by pretrain.py
    gen_lr: float = 1e-3  # Adam lr of G, stage A and B2: argparse default of cfg.py
    mround: int = 20  # B1 mask epochs per round: the repository's shell script defense.sh
    mask_lr: float = 0.01  # Adam lr of the mask logits: hard-coded in btidbfu.py
    uround: int = 30  # B2 generator epochs per round: the repository's shell script defense.sh
    # B2: max image MSE (normalised space) before only L_img is minimised: defense.sh (= argparse default of cfg.py)
    norm_bound: float = 0.3
    feat_bound: float = 3.0  # B2: max benign-feature MSE: argparse default of cfg.py
    nround: int = 3  # rounds of B1-B4: the repository's shell script defense.sh (argparse default: 5)
    ul_round: int = 30  # B4 unlearning epochs per round: the repository's shell script defense.sh
    batch_size: int = 128  # the repository's shell script defense.sh (= argparse default of cfg.py)
    # share of each unlearning batch replaced by G(x), k = int(0.2|B| + 1): hard-coded in btidbfu.py
    gen_ratio: float = 0.2
    # B3: Gaussian noise (normalised space) added before G when detecting the target: hard-coded in evaluate.py
    noise_std: float = 0.03
    crop_pad: int = 4  # train transform of the official loader (cifar.py): random crop with zero padding 4
    flip: bool = True  # train transform of the official loader (cifar.py): horizontal flip
    generator_width: int = 32  # U-Net base width (32/64/128/256, bottleneck 512): hard-coded in btidbfu.py

    def image_passes(self, images: int) -> float:
        """The generator's epochs (each through the U-Net and the classifier), then the unlearning epochs."""
        generator_epochs = self.preround + self.nround * (self.mround + self.uround)
        return images * (2 * generator_epochs + self.passes_per_step * self.nround * self.ul_round)

    def shared_work(self, images: int) -> tuple[str, float] | None:
        """The first round's generator epochs (`shared_first_round`): computed once for BTI-DBF(U) and PAM."""
        settings = sorted(first_round_settings(self).items())
        return f"bti-first-round {settings}", 2.0 * images * (self.preround + self.mround + self.uround)

    @classmethod
    def defender_size(cls, num_train: int, num_classes: int) -> int:
        """The official loaders draw a fixed number of training images: 2,500 (`fine_tune/BTIDBF/cifar.py`), 5,000
        for CIFAR-100 (`cifar100.py`)."""
        return min(num_train, 5000 if num_classes >= 100 else 2500)


def reserve_batches(data: ImageSet, stages: BTIStages, gen: torch.Generator, augmented: bool = True):
    """Shuffled float batches of the (device-resident) reserve, augmented like the official train loader."""
    for idx in batch_indices(len(data), stages.batch_size, gen, drop_last=keep_full_batches(len(data), stages)):
        idx = idx.to(data.images.device)
        x = to_float(data.images[idx])
        yield (augment(x, stages.crop_pad, stages.flip, gen) if augmented else x), data.labels[idx]


def keep_full_batches(n: int, stages: BTIStages) -> bool:
    # The official loader keeps the last partial batch; drop it only when it would hold a single
    # sample, which BatchNorm cannot normalise in train mode.
    return n % stages.batch_size == 1


def frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False)


def pretrain_generator(generator: TriggerGenerator, model: nn.Module, data: ImageSet, stages: BTIStages,
                       gen: torch.Generator) -> list[float]:
    """Stage A: make G the identity in prediction and feature space of the (frozen, eval) classifier."""
    classifier = frozen_copy(model).eval()
    optimizer = torch.optim.Adam(generator.parameters(), lr=stages.gen_lr)
    generator.train()
    losses = []
    for _ in range(stages.preround):
        total, steps = 0.0, 0
        for x, _ in reserve_batches(data, stages, gen):
            with torch.no_grad():
                feats_x = classifier.features(x)
                logits_x = classifier.head(feats_x)
            p = generator(x)
            feats_p = classifier.features(p)
            loss = pretrain_loss(logits_x, classifier.head(feats_p), feats_x, feats_p, generator.image_loss(x, p))
            total, steps = total + step(optimizer, loss), steps + 1
        losses.append(total / max(steps, 1))
    return losses


def train_mask(classifier: nn.Module, data: ImageSet, stages: BTIStages, gen: torch.Generator) -> tuple[Tensor, list]:
    """B1: a benign-feature mask over the feature map, learned on `classifier` (a copy) in train mode.

    Only the copy's BN running statistics change; features are computed without gradients since only
    the mask logits are optimised. Returns the mask [1, C, h, w] in (0, 1) and the per-epoch losses.
    """
    sample = to_float(data.images[:2])
    with torch.no_grad():
        shape = (1, *classifier.eval().features(sample).shape[1:])
    classifier.train()
    mask_logits = torch.randn(shape, generator=gen).to(sample.device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logits], lr=stages.mask_lr)
    losses = []
    for _ in range(stages.mround):
        total, steps = 0.0, 0
        for x, y in reserve_batches(data, stages, gen):
            with torch.no_grad():
                feats = classifier.features(x)
            loss = mask_loss(classifier.head, feats, mask_from_logits(mask_logits), y)
            total, steps = total + step(optimizer, loss), steps + 1
        losses.append(total / max(steps, 1))
    return mask_from_logits(mask_logits).detach(), losses


def train_generator(generator: TriggerGenerator, optimizer: torch.optim.Optimizer, classifier: nn.Module,
                    mask: Tensor, target: int | None, data: ImageSet, stages: BTIStages,
                    gen: torch.Generator) -> list[float]:
    """B2: train G against the masked copy (eval mode); from round 1 on also pull G(x) to the target."""
    classifier.eval()
    generator.train()
    losses = []
    for _ in range(stages.uround):
        total, steps = 0.0, 0
        for x, _ in reserve_batches(data, stages, gen):
            with torch.no_grad():
                feats_x = classifier.features(x)
            x_gen = generator(x)
            feats_g = classifier.features(x_gen)
            loss = generator_loss(feats_x, feats_g, mask, generator.image_loss(x, x_gen), stages.norm_bound,
                                  stages.feat_bound)
            if target is not None:
                targets = torch.full((len(x),), target, dtype=torch.long, device=x.device)
                loss = loss + F.cross_entropy(classifier.head(feats_g), targets)
            total, steps = total + step(optimizer, loss), steps + 1
        losses.append(total / max(steps, 1))
    return losses


# B3 warns when the winning class leads the runner-up by less than this share of all votes: then a small
# change (another CPU, bf16 training, a few more generator steps) can flip which class gets unlearned.
CLOSE_VOTE_MARGIN = 0.1


@torch.no_grad()
def detect_target(generator: TriggerGenerator, model: nn.Module, data: ImageSet, stages: BTIStages,
                  num_classes: int, gen: torch.Generator) -> tuple[int, list[int]]:
    """B3: the class most often predicted for G(x + noise) over one pass of augmented reserve batches, as
    the official vote over its training loader (classifier and G in eval mode)."""
    generator.eval()  # and it stays so: the next round's stage A sets its own mode
    votes = torch.zeros(num_classes, dtype=torch.long)
    with eval_mode(model):
        for x, _ in reserve_batches(data, stages, gen):
            z = generator.normalize(x)
            noisy = z + stages.noise_std * torch.randn(z.shape, generator=gen).to(z.device)
            votes += torch.bincount(model(generator.from_normalized(noisy)).argmax(1).cpu(), minlength=num_classes)
    return int(votes.argmax()), votes.tolist()


def vote_margin(votes: list[int]) -> float:
    """(winner's votes − runner-up's votes) / all votes: 1 for a unanimous vote, 0 for a tie."""
    ranked = sorted(votes, reverse=True) + [0]
    return (ranked[0] - ranked[1]) / max(sum(votes), 1)


def step(optimizer: torch.optim.Optimizer, loss: Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class Clock:
    """Seconds since the previous lap, for the per-stage timings in the record."""

    def __init__(self):
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


@dataclass
class FirstRound:
    """Stage A and round 0's B1-B3: G, its Adam state, the detected target and their record.

    They depend only on the backdoored model, the reserve, the inversion settings and the seed, never on
    the unlearning that follows, so BTI-DBF(U) and PAM of one backdoored model share them.
    """

    generator: TriggerGenerator
    optimizer: torch.optim.Adam
    record: dict


# Settings that shape the first round; the rest (nround, ul_round, gen_ratio, each defense's own) act later.
LATER_SETTINGS = {"nround", "ul_round", "gen_ratio"}
SHARED_ROUNDS = 2  # first rounds kept in memory: the last backdoored models' (~0.1 GB each for the CIFAR U-Net)
_first_rounds: OrderedDict[str, FirstRound] = OrderedDict()


def first_round_settings(stages: BTIStages) -> dict:
    """The settings the first round reads (every BTIStages field but the later rounds')."""
    return {f.name: getattr(stages, f.name) for f in dataclasses.fields(BTIStages) if f.name not in LATER_SETTINGS}


def first_round_key(model: nn.Module, reserve: ImageSet, num_classes: int, stages: BTIStages, seed: int) -> str:
    """Content hash of everything the first round reads: weights and buffers, reserve, settings, seed."""
    digest = hashlib.sha256()
    settings = first_round_settings(stages)
    digest.update(repr((sorted(settings.items()), num_classes, seed, str(model_device(model)))).encode())
    tensors = [(name, t) for name, t in sorted(model.state_dict().items())] + \
        [("reserve.images", reserve.images), ("reserve.labels", reserve.labels)]
    for name, tensor in tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(flat.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def shared_first_round(model: nn.Module, reserve: ImageSet, num_classes: int, stages: BTIStages,
                       seed: int) -> FirstRound:
    """`first_round`, computed once per backdoored model and settings in this process; every caller gets its
    own copy of G and its optimizer (`reused: true` in the record when it was computed before)."""
    key = first_round_key(model, reserve, num_classes, stages, seed)
    reused = key in _first_rounds
    if not reused:
        _first_rounds[key] = first_round(model, reserve, num_classes, stages, seed)
        while len(_first_rounds) > SHARED_ROUNDS:
            _first_rounds.popitem(last=False)
    _first_rounds.move_to_end(key)
    kept = _first_rounds[key]
    generator, optimizer = copy.deepcopy((kept.generator, kept.optimizer))  # one copy keeps G's params in its Adam
    return FirstRound(generator, optimizer, {**copy.deepcopy(kept.record), "reused": reused})


def first_round(model: nn.Module, reserve: ImageSet, num_classes: int, stages: BTIStages, seed: int) -> FirstRound:
    """Stage A, then round 0's B1 (mask), B2 (generator) and B3 (target vote); `model` is only read."""
    generator = create_generator(model, reserve.shape[0], seed_for(seed, "bti-generator"), stages.generator_width)
    gen = torch.Generator().manual_seed(seed_for(seed, "bti-pretrain"))
    clock = Clock()
    record = {"pretrain_losses": pretrain_generator(generator, model, reserve, stages, gen), "pretrain_s": clock.lap(),
              "target": None, "target_votes": None, "target_vote_margin": None}
    # G and its Adam state persist across rounds (not re-initialised), as in the official code.
    optimizer = torch.optim.Adam(generator.parameters(), lr=stages.gen_lr)
    if stages.nround == 0:
        return FirstRound(generator, optimizer, record)
    gen = torch.Generator().manual_seed(seed_for(seed, "bti-round0"))
    classifier = frozen_copy(model)
    mask, mask_losses = train_mask(classifier, reserve, stages, gen)
    mask_s = clock.lap()
    gen_losses = train_generator(generator, optimizer, classifier, mask, None, reserve, stages, gen)
    target, votes = detect_target(generator, model, reserve, stages, num_classes, gen)
    record.update(target=target, target_votes=votes, target_vote_margin=vote_margin(votes),
                  round0={"mask_losses": mask_losses, "generator_losses": gen_losses, "mask_s": mask_s,
                          "generator_s": clock.lap()})
    log.info("BTI: detected target class %d (votes %s)", target, votes)
    if record["target_vote_margin"] < CLOSE_VOTE_MARGIN:
        log.warning("BTI: close target vote (class %d leads by %.1f%% of the votes: %s); the inverted trigger may "
                    "belong to another class; lengthen preround/uround", target, 100 * record["target_vote_margin"],
                    votes)
    return FirstRound(generator, optimizer, record)


def run_bti(model: nn.Module, data: DefenderData, stages: BTIStages, seed: int, unlearn: Unlearn) -> dict:
    """Stage A, then `nround` rounds of B1 (mask), B2 (generator), B3 (target, round 0) and `unlearn` (B4).

    `model` is updated only by `unlearn`; masks and generator training use copies of it. Stage A and round
    0's B1-B3 come from `shared_first_round`. Returns the JSON-able record: detected target and its votes,
    per-epoch losses per stage and round, step count.
    """
    reserve = data.reserve.to(model_device(model))
    first = shared_first_round(model, reserve, data.num_classes, stages, seed)
    generator, optimizer = first.generator, first.optimizer
    record = {**{k: v for k, v in first.record.items() if k not in ("round0", "reused")}, "rounds": [], "steps": 0,
              "first_round_reused": first.record["reused"]}
    clock = Clock()
    for n in range(stages.nround):
        if n == 0:
            round_record = dict(first.record["round0"])
        else:
            gen = torch.Generator().manual_seed(seed_for(seed, f"bti-round{n}"))
            classifier = frozen_copy(model)
            mask, mask_losses = train_mask(classifier, reserve, stages, gen)
            mask_s = clock.lap()
            gen_losses = train_generator(generator, optimizer, classifier, mask, record["target"], reserve, stages,
                                         gen)
            round_record = {"mask_losses": mask_losses, "generator_losses": gen_losses, "mask_s": mask_s,
                            "generator_s": clock.lap()}
        result = unlearn(n, generator, seed_for(seed, f"bti-unlearn{n}"))
        record["steps"] += result["steps"]
        record["rounds"].append({**round_record, "unlearn_losses": result["epoch_losses"], "unlearn_s": clock.lap()})
        log.info("BTI round %d/%d: unlearning loss %.4f", n + 1, stages.nround,
                 result["epoch_losses"][-1] if result["epoch_losses"] else float("nan"))
    return record
