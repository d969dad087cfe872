"""Folders of poisoned images, as a practitioner holds the attacker's trigger: `DIR/<attack label>/<images>`.

The training folder gives RA (and the budget curve) its poisons, exactly as the files hold them; the test
folder gives every ASR: the share of its images predicted as their folder's label. The folders do not say
which class each picture showed before the trigger, so QRA asks the clean reference model (`carriers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import DataBundle, ImageSet, Split
from ..data.formats import IMAGE_SUFFIXES
from ..errors import UsageError
from ._common import AttackerPoisons
from .images import decode_poisons

LABEL_POLICIES = ("all2one", "all2all")


@dataclass(frozen=True)
class PoisonFolders:
    """The attacker's poisoned training and test images, each folder laid out as `<attack label>/<image files>`.

    `labels`: "all2one" (one label folder: the target) or "all2all" (class y was sent to (y + 1) mod C; the
    folders then hold several labels)."""

    train: str | Path
    test: str | Path
    labels: str = "all2one"

    def __post_init__(self):
        if self.labels not in LABEL_POLICIES:
            raise UsageError(f"poison folders' labels must be one of {', '.join(LABEL_POLICIES)}, got {self.labels!r}")

    def describe(self) -> dict:
        return {"kind": "poison_folders", "train": str(Path(self.train).resolve()),
                "test": str(Path(self.test).resolve()), "labels": self.labels}

    def poisons(self, bundle: DataBundle, split: Split, seed: int) -> AttackerPoisons:
        train = read_poison_folder(Path(self.train), bundle.shape, bundle.num_classes)
        test = read_poison_folder(Path(self.test), bundle.shape, bundle.num_classes)
        target = self.target_of(train, test)
        return AttackerPoisons({**self.describe(), "num_train": len(train), "num_test": len(test)}, train, None,
                               test, target, self.labels)

    def target_of(self, train: ImageSet, test: ImageSet) -> int:
        classes = torch.cat([train.labels, test.labels]).unique()
        if self.labels == "all2one" and len(classes) > 1:
            raise UsageError(f"the poison folders hold {len(classes)} label folders ({', '.join(map(str, classes.tolist()))})"
                             " but an all-to-one backdoor has one target; keep the target's folder, or pass "
                             "--labels all2all")
        return int(classes[0])


def label_folders(root: Path, num_classes: int) -> list[tuple[int, Path]]:
    """(label, folder) of `root`'s sub-folders, each named by a class index of the dataset."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder; lay the poisons out as {root}/<attack label>/<image files>")
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not folder.name.isdigit() or int(folder.name) >= num_classes:
            raise UsageError(f"{folder}: '{folder.name}' is not a class of the dataset (0..{num_classes - 1}); name "
                             "each folder by the attack label its images should get")
        found.append((int(folder.name), folder))
    if not found:
        raise UsageError(f"{root} holds no label folders; lay the poisons out as {root}/<attack label>/<image files>")
    return found


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def read_poison_folder(root: Path, shape: tuple[int, int, int], num_classes: int) -> ImageSet:
    """Every image under `root/<label>/`, decoded for the dataset's `shape`, labelled with its folder's label.
    A file that is not an image is refused (not skipped): a poison folder holds poisons only."""
    files, labels = [], []
    for label, folder in label_folders(root, num_classes):
        found = image_files(folder)
        if not found:
            raise UsageError(f"{folder} is empty; put the poisoned images of label {label} in it, or remove it")
        strange = [p for p in found if p.suffix.lower() not in IMAGE_SUFFIXES]
        if strange:
            raise UsageError(f"{strange[0]} is not an image file (PNG, JPEG, PPM, ...); remove it from the poison "
                             "folder")
        files += found
        labels += [label] * len(found)
    if not files:
        raise UsageError(f"{root} holds no images; put the poisoned images in {root}/<attack label>/")
    return ImageSet(decode_poisons(files, shape), torch.tensor(labels, dtype=torch.int64))
