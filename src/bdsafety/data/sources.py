"""Dataset names -> DataBundle, with data-directory resolution: --data-dir > $BDSAFETY_DATA > system paths."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from . import formats, layouts
from .imageset import DataBundle, ImageSet
from .synthetic import synthetic_bundle

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Source:
    """How to find and read one named dataset."""

    loader: Callable[[Path], tuple[ImageSet, ImageSet, int]]
    markers: tuple[str, ...]  # files or folders (paths relative to it) whose presence identifies the dataset's folder
    system_paths: tuple[str, ...]
    how_to_get: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _idx(folder: Path):
    return formats.load_idx_pair(folder, "train"), formats.load_idx_pair(folder, "test"), 10


def _cifar(variant: int):
    def load(folder: Path):
        return formats.load_cifar(folder, variant, "train"), formats.load_cifar(folder, variant, "test"), variant

    return load


def _folder(size: int):
    def load(folder: Path):
        classes = formats.class_folders(folder / "train")
        test_classes = formats.class_folders(folder / "test")
        if test_classes != classes:
            raise UsageError(f"{folder}: test/ class folders differ from train/; they must name the same classes")
        train = formats.load_image_folder(folder / "train", classes, size, 3)
        return train, formats.load_image_folder(folder / "test", classes, size, 3), len(classes)

    return load


def _gtsrb(folder: Path, roi_crop: bool = False):
    """The official archives' layout, else the common re-packaging, else train/<class>/ + test/<class>/."""
    root = layouts.gtsrb_official_root(folder)
    if root is not None:
        return layouts.load_gtsrb_official(root, folder, roi_crop)
    root = layouts.gtsrb_repack_root(folder)
    if root is not None:
        return layouts.load_gtsrb_repack(root, roi_crop)
    return _folder(layouts.GTSRB_SIZE)(folder)


def _tiny_imagenet(folder: Path):
    """The published layout (tiny-imagenet-200/), else train/<class>/ + test/<class>/."""
    root = layouts.tiny_imagenet_root(folder)
    if root is not None:
        return layouts.load_tiny_imagenet(root)
    return _folder(layouts.TINY_IMAGENET_SIZE)(folder)


def _and_under(subfolder: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return names + tuple(f"{subfolder}/{name}" for name in names)


SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(
        _idx, ("train-images-idx3-ubyte",), ("/usr/share/datasets/fashion-mnist",),
        "sudo apt-get install dataset-fashion-mnist", (0.2860,), (0.3530,),
    ),
    "mnist": Source(
        _idx, ("train-images-idx3-ubyte",), ("/usr/share/datasets/mnist", "/usr/share/mnist"),
        "download the four MNIST IDX files into a folder and pass --data-dir", (0.1307,), (0.3081,),
    ),
    "cifar10": Source(
        _cifar(10), ("data_batch_1",), ("/usr/share/datasets/cifar-10-batches-py",),
        "extract cifar-10-python.tar.gz and pass --data-dir .../cifar-10-batches-py",
        (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261),
    ),
    "cifar100": Source(
        _cifar(100), ("train",), ("/usr/share/datasets/cifar-100-python",),
        "extract cifar-100-python.tar.gz and pass --data-dir .../cifar-100-python", IMAGENET_MEAN, IMAGENET_STD,
    ),
    "gtsrb": Source(
        _gtsrb, _and_under("GTSRB", layouts.OFFICIAL_MARKERS + layouts.REPACK_MARKERS) + ("train",), (),
        "extract GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip into DIR "
        "(DIR/GTSRB/Final_Training/Images/000NN/, DIR/GTSRB/Final_Test/Images/, GT-final_test.csv), or use the "
        "re-packaging DIR/Train/<class id>/*.png + DIR/Test/*.png + DIR/Test.csv, or arrange DIR/train/<class>/* and "
        "DIR/test/<class>/*; then pass --data-dir DIR",
        (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
    ),
    "gtsrb-roi": Source(
        lambda folder: _gtsrb(folder, roi_crop=True),
        _and_under("GTSRB", layouts.OFFICIAL_MARKERS + layouts.REPACK_MARKERS), (), "GTSRB cropped to each image's region of interest (Roi.X1..Y2 of its CSV) before resizing: the official "
        "archives or the re-packaging with its Train.csv and Test.csv, as for 'gtsrb'; pass --data-dir DIR",
        (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
    ),
    "tiny-imagenet": Source(
        _tiny_imagenet, _and_under("tiny-imagenet-200", layouts.TINY_MARKERS) + ("train",), (),
        "extract tiny-imagenet-200.zip into DIR (DIR/tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/, "
        "val/images/ and val/val_annotations.txt), or arrange DIR/train/<class>/* and DIR/test/<class>/*; "
        "then pass --data-dir DIR",
        IMAGENET_MEAN, IMAGENET_STD,
    ),
}
DATASET_NAMES = sorted([*SOURCES, "synthetic"])


def candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Where to look for `name`, in priority order."""
    if data_dir is not None:
        return [Path(data_dir)]
    found = []
    env = os.environ.get("BDSAFETY_DATA")
    if env:
        found += [Path(env) / name, Path(env) / name.removesuffix("-roi"), Path(env)]
    return found + [Path(p) for p in SOURCES[name].system_paths]


def resolve_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding dataset `name`, or a UsageError saying where we looked and how to get it."""
    source = SOURCES[name]
    tried = candidate_dirs(name, data_dir)
    for folder in tried:
        if any((folder / m).exists() or (folder / f"{m}.gz").exists() for m in source.markers):
            return folder
    where = ", ".join(str(p) for p in tried) or "nowhere (no --data-dir, no $BDSAFETY_DATA)"
    raise UsageError(f"dataset '{name}' not found (looked in: {where}); to get it: {source.how_to_get}")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0) -> DataBundle:
    """Load a dataset by name into uint8 tensors. `synthetic` is generated from `seed`, others read from disk."""
    if name == "synthetic":
        return synthetic_bundle(seed)
    if name not in SOURCES:
        raise UsageError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")
    source = SOURCES[name]
    train, test, num_classes = source.loader(resolve_dir(name, data_dir))
    for split, images in (("train", train), ("test", test)):
        if len(images) == 0:
            raise UsageError(f"dataset '{name}' has an empty {split} split")
        bad = (images.labels < 0) | (images.labels >= num_classes)
        if bool(bad.any()):
            raise UsageError(f"dataset '{name}' {split} split has labels outside 0..{num_classes - 1}")
    return DataBundle(name, train, test, num_classes, source.mean, source.std)

