"""Datasets as uint8 tensors: loaders for the standard formats, seeded splits, batched augmentation."""

from .augment import augment
from .imageset import DataBundle, ImageSet, to_float, to_uint8
from .sources import DATASET_NAMES, load_dataset, resolve_dir
from .splits import Split, calibration_split, defender_split, run_split, seed_for, split_reserve

__all__ = [
    "augment", "DataBundle", "ImageSet", "to_float", "to_uint8", "DATASET_NAMES", "load_dataset", "resolve_dir",
    "Split", "calibration_split", "defender_split", "run_split", "seed_for", "split_reserve",
]
