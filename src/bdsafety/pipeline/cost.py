"""What each stage of a run costs, in image passes through the classifier: the progress line's first estimate.

Before a kind of stage has run once, the progress line charges it its image passes times the seconds per image
pass of the stages timed so far (the first is a model training), instead of the mean of those stages. A forward
and backward pass over one image counts 1, a forward pass alone `FORWARD` (the backward pass costs about twice
the forward one). Each method counts its own passes (`image_passes` in its file; the defaults in its family's
`_common.py` count its epochs, or iterations × batch, over its data), so the estimate follows the spec's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

FORWARD = 1 / 3


@dataclass(frozen=True)
class DataSizes:
    """How many images a run's stages see."""

    train: int  # images a model trains on
    test: int  # clean test images (the triggered test set is at most as large)
    defender: Callable[[object], int]  # a defense -> the images it holds

    @property
    def evaluation(self) -> float:
        """One evaluation on the clean and the triggered test set."""
        return 2 * self.test * FORWARD


def data_sizes(context) -> DataSizes:
    """The sizes of a run's data (`context`: its `pipeline.context.RunContext`)."""
    spec, bundle = context.plan.spec, context.bundle
    total = len(bundle.train)
    held_out = round(total * (spec.reserve_fraction + spec.calibration_fraction))
    reserve = round(total * spec.reserve_fraction)

    def defender(defense) -> int:
        if spec.defender_data != "official":
            return reserve
        return defense.defender_size(total, bundle.num_classes)

    return DataSizes(train=total - held_out, test=len(bundle.test), defender=defender)


def stage_costs(graph, context) -> dict[str, float]:
    """Every node's directory -> its image passes (`graph`: a `pipeline.graph.StageGraph`)."""
    plan, sizes = graph.plan, data_sizes(context)
    costs, shared = {}, set()  # shared: (backdoored model, work) already charged to an earlier defense
    for node in graph.nodes:
        if node.kind == "train":
            cost = plan.train_config.epochs * sizes.train + sizes.evaluation
        elif node.kind == "purify":
            defense = plan.defenses[node.name]
            images = sizes.defender(defense)
            cost = defense.image_passes(images) + sizes.evaluation
            if (work := defense.shared_work(images)) is not None:
                key = (node.parent_keys["backdoored"], work[0])
                cost -= work[1] if key in shared else 0.0
                shared.add(key)
        elif node.kind == "audit":
            cost = plan.audits[node.name].image_passes(sizes)
        else:
            cost = sizes.evaluation
        costs[node.directory] = float(cost)
    return costs
