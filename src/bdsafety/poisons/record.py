"""A BackdoorBench record folder as the source of the attacker's poisons (`--backdoorbench RECORD_DIR`).

The poisons are the images the attack saved, exactly as saved (`backdoorbench.read_record`): RA draws from
the label-changing training poisons (the official `fine_tune/ft_poison.py` reads the same
`bd_train_dataset/*/*.png`; WaNet's noise-mode images, which keep their label, are left out), every ASR
is measured on `bd_test`, and QRA's carriers keep their saved original labels. The target (or
all-to-all) is read off the saved labels: BackdoorBench does not store it beside them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..data import DataBundle, Split
from ..errors import UsageError
from ._common import AttackerPoisons, check_labels, label_changing, policy_of
from .backdoorbench import BackdoorBenchRecord, locate, read_record


@dataclass(frozen=True)
class RecordSource:
    """The poisons of the BackdoorBench record in `folder` (`record/<name>/`, or its attack_result.pt)."""

    folder: str | Path

    @property
    def folder_path(self) -> Path:
        return locate(Path(self.folder))[0]

    def attack_result(self) -> Path:
        return locate(Path(self.folder))[1]

    def defense_results(self) -> list[Path]:
        """Every `defense/<name>/defense_result.pt` of the record, by name."""
        return sorted((self.folder_path / "defense").glob("*/defense_result.pt"))

    def describe(self) -> dict:
        return {"kind": "backdoorbench_record", "folder": str(self.folder_path.resolve())}

    def read(self, shape: tuple[int, int, int]) -> BackdoorBenchRecord:
        if shape[1] != shape[2]:
            raise UsageError(f"BackdoorBench records hold square images; this dataset's are {shape[2]}x{shape[1]}")
        return cached_record(self.folder_path.resolve(), shape[0], shape[1])

    def poisons(self, bundle: DataBundle, split: Split, seed: int) -> AttackerPoisons:
        record, where = self.read(bundle.shape), str(self.folder_path)
        if record.num_classes not in (None, bundle.num_classes):
            raise UsageError(f"{where} is a {record.num_classes}-class record and {bundle.name} has "
                             f"{bundle.num_classes} classes; pass the dataset the attack used")
        if record.train is None or len(record.train.images) == 0:
            raise UsageError(f"{where} saved no poisoned training images (bd_train), which RA needs; rerun the "
                             "attack with its bd_train saved")
        test = record.test
        for part, name in ((record.train, "bd_train"), (test, "bd_test")):
            check_labels(part.images.labels, bundle.num_classes, f"{where} {name}")
            check_labels(part.original_labels, bundle.num_classes, f"{where} {name}")
        if int(test.indices.max()) >= len(bundle.test):
            raise UsageError(f"{where} names test image {int(test.indices.max())} but {bundle.name} has "
                             f"{len(bundle.test)}; pass the dataset the attack used")
        target, policy = policy_of(test.images.labels, test.original_labels, bundle.num_classes, f"{where} bd_test")
        keep = label_changing(record.train.images, record.train.original_labels)
        train = record.train.images.subset(keep)
        counts = {"num_train": len(train), "num_test": len(test.images), "target": target, "labels": policy}
        return AttackerPoisons({**self.describe(), **counts}, train, record.train.original_labels[keep], test.images,
                               target, policy, None, (bundle.test.images[test.indices], test.images.images))


@functools.lru_cache(maxsize=2)
def cached_record(folder: Path, channels: int, size: int) -> BackdoorBenchRecord:
    """One read of a record per process (`bdsafety audit --backdoorbench` audits every defense against it)."""
    return read_record(folder, channels, size)
