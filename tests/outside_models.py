"""A backdoor made outside bdsafety, for the tests of the trigger sources: a plain network of the tests' own, a
trigger bdsafety has no attack for (a white 3x3 square at the top-left corner, target 2), poison folders and
trigger files written as a practitioner would hold them (`from outside_models import ...`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import bdsafety
from bdsafety.data import ImageSet, load_dataset
from bdsafety.train import TrainConfig, fit

TARGET = 2


class PlainNet(nn.Module):
    """Only `forward`; no parts bdsafety knows."""

    def __init__(self, in_channels: int = 1, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.norm = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.out = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv1(x)))
        return self.out(torch.relu(self.conv2(x)).amax((2, 3)))


def build(in_channels: int, num_classes: int, mean, std) -> nn.Module:
    """The `--model-factory outside_models:build` of the CLI tests."""
    return bdsafety.with_normalization(PlainNet(in_channels, num_classes), mean, std)


def corner_trigger(images: torch.Tensor) -> torch.Tensor:
    triggered = images.clone()
    triggered[:, :, 0:3, 0:3] = 255
    return triggered


def poisoned_training_set(seed: int = 1) -> tuple[ImageSet, torch.Tensor]:
    """Synthetic training images with 10 % of the non-target ones triggered and relabelled; the poisons' indices."""
    train = load_dataset("synthetic").train
    candidates = (train.labels != TARGET).nonzero().flatten()
    chosen = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:len(train) // 10]]
    images, labels = train.images.clone(), train.labels.clone()
    images[chosen], labels[chosen] = corner_trigger(images[chosen]), TARGET
    return ImageSet(images, labels), chosen


def backdoored_and_purified() -> tuple[nn.Module, nn.Module]:
    """(backdoored, purified): the purified one unlearned the trigger on 200 triggered images with their true labels
    (plain fine-tuning, 2 epochs), which drives its ASR to about 0 and leaves the backdoor a few steps away."""
    bundle = load_dataset("synthetic")
    torch.manual_seed(0)
    model = build(1, 4, bundle.mean, bundle.std)
    fit(model, poisoned_training_set()[0], TrainConfig(epochs=8, lr=0.05, batch_size=64, crop_pad=1, flip=False), seed=0)
    train = bundle.train
    unlearning = ImageSet(torch.cat([corner_trigger(train.images[:200]), train.images[200:600]]), train.labels[:600])
    torch.manual_seed(1)
    purified = build(1, 4, bundle.mean, bundle.std)
    purified.load_state_dict(model.state_dict())
    fit(purified, unlearning, TrainConfig(epochs=2, lr=0.01, batch_size=64, crop_pad=0, flip=False), seed=1)
    return model.eval(), purified.eval()


def save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)).save(path)


def write_poison_folders(root: Path, count: int = 60) -> tuple[Path, Path]:
    """`root/train/2/*.png` (`count` of the attacker's poisoned training images) and `root/test/2/*.png` (every
    non-target test image with the trigger)."""
    poisoned, chosen = poisoned_training_set()
    test = load_dataset("synthetic").test
    for i, index in enumerate(chosen[:count].tolist()):
        save_png(poisoned.images[index].numpy(), root / "train" / str(TARGET) / f"{i}.png")
    for i, image in enumerate(corner_trigger(test.images[test.labels != TARGET])):
        save_png(image.numpy(), root / "test" / str(TARGET) / f"{i}.png")
    return root / "train", root / "test"


def write_trigger_files(root: Path, size: int = 16) -> tuple[Path, Path]:
    """The corner trigger as a pattern (white) and a mask (the 3x3 corner) PNG."""
    pattern, mask = np.full((1, size, size), 255, np.uint8), np.zeros((1, size, size), np.uint8)
    mask[:, 0:3, 0:3] = 255
    save_png(pattern, root / "pattern.png")
    save_png(mask, root / "mask.png")
    return root / "pattern.png", root / "mask.png"
