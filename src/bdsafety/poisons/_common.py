"""Where an audit's poisons come from: one explicit input of every audit, recorded with its results.

A trigger source turns into `AttackerPoisons` on one dataset: the poisoned training samples RA and the
budget curve draw from, the triggered test images every ASR is measured on, and, where the source defines
one, the trigger itself. Four sources exist: bdsafety's own attacks (`pipeline.setup.prepare`), a
BackdoorBench record folder (`backdoorbench.py`), folders of poisoned images (`folders.py`) and a trigger
pattern with its mask (`trigger_file.py`). No source is ever substituted for another: a model whose
trigger is unknown is refused (`UNKNOWN_TRIGGER`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from ..data import DataBundle, ImageSet, Split
from ..errors import UsageError

UNKNOWN_TRIGGER = ("give the attacker's own poisons: --backdoorbench RECORD_DIR, --poisons-train DIR --poisons-test "
                   "DIR, or --trigger PNG --trigger-mask PNG --target T")
IMPLANTED_ASR = 0.5  # below this ASR on the backdoored model, the poisons are not its backdoor (the sanity gate)


@dataclass(frozen=True)
class AttackerPoisons:
    """The attacker's poisons on one dataset, as a trigger source gives them."""

    source: dict  # what the audit records: {"kind": ..., and the source's own fields}
    train: ImageSet  # backdoor-carrying poisoned training samples, labelled with their attack label
    train_true_labels: Tensor | None  # their original class where the source knows it (QRA's carriers), else None
    test: ImageSet  # the triggered test images, labelled with their attack label (every ASR)
    target: int  # the all-to-one target (unused by all-to-all)
    label_policy: str = "all2one"  # or "all2all": class y -> (y + 1) mod C
    trigger: Callable[[Tensor], Tensor] | None = None  # float [0, 1] images -> triggered, where the source has one
    # (clean, triggered) uint8 test images of the same pictures (BEC's pairs), where the source pairs them
    test_pairs: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def carriers(self, count: int, seed: int) -> ImageSet:
        """`count` seeded poisoned training images whose attack label is not their own class, labelled with that
        class (QRA's trigger carriers); -1 where the source does not know it (QRA then asks the clean model)."""
        if self.train_true_labels is None:
            candidates, labels = torch.arange(len(self.train)), torch.full((len(self.train),), -1)
        else:
            candidates = (self.train.labels != self.train_true_labels).nonzero().flatten()
            labels = self.train_true_labels
        if count > len(candidates):
            raise UsageError(f"qra poison_count={count} but the attacker's training poisons hold only "
                             f"{len(candidates)} label-changing images; lower qra.poison_count")
        chosen = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:count]]
        return ImageSet(self.train.images[chosen], labels[chosen].to(torch.int64))


class TriggerSource(Protocol):
    """A source of the attacker's poisons: `poisons` builds them on a loaded dataset and its split."""

    def describe(self) -> dict: ...

    def poisons(self, bundle: DataBundle, split: Split, seed: int) -> AttackerPoisons: ...


def label_changing(poisoned: ImageSet, true_labels: Tensor) -> Tensor:
    """Indices of the poisons that carry the backdoor by changing the label; all of them for a clean-label attack
    (whose poisons keep their label). Leaves out WaNet-style noise-mode samples, which keep their own label."""
    changing = (poisoned.labels != true_labels).nonzero().flatten()
    return changing if len(changing) else torch.arange(len(poisoned))


def check_labels(labels: Tensor, num_classes: int, where: str) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise UsageError(f"{where}: label {int(bad[0])} is not a class of the dataset (0..{num_classes - 1}); "
                         "check --dataset")


def policy_of(labels: Tensor, true_labels: Tensor | None, num_classes: int, where: str) -> tuple[int, str]:
    """(target, label policy) that the attack labels show: one label for all is all-to-one; (y + 1) mod C of
    every original label is all-to-all; anything else cannot be audited as one backdoor."""
    classes = labels.unique()
    if len(classes) == 1:
        return int(classes[0]), "all2one"
    if true_labels is not None and bool(((true_labels + 1) % num_classes == labels).all()):
        return 0, "all2all"
    raise UsageError(f"{where}: the poisons carry {len(classes)} attack labels that are neither one target nor "
                     "(y + 1) mod C (all-to-all); audit one target at a time")
