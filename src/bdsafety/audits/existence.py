"""Backdoor Existence Coefficient (BEC; Zhu, Liang & Wu, NeurIPS 2024, "Breaking the False Sense of Security
in Backdoor Defense through Re-Activation Attack", §3; official `BEC/analy_backdoor_acti.py`,
`BEC/analy_backdoor_cka.py`, `BEC/analy_backdoor_bec.py`, `BEC/analy_backdoor_plot.py`,
`analysis/CKA_similarity_torch.py`, `models/preact_resnet_CLP.py`).

Does the backdoor still live inside a purified model? The official pipeline, step by step:

1. Backdoor-related neurons (`analy_backdoor_acti.py` with the CLP-instrumented PreAct-ResNet-18 of
   `preact_resnet_CLP.py`, `--sort_standard diff`): 2,200 random non-target test images and their triggered
   versions go through the BACKDOORED model in batches of 250 pairs. For every convolution of the residual
   stages (`nn.Conv2d` in `layer*`, shortcuts and the stem excluded) and each of its output channels c,
   `diff_c` sums over the batches mean_n ‖a_c(x_n^bd) − a_c(x_n)‖₂ (L2 over the spatial map) divided by the
   batch's mean per-image L2 norm of the whole output (one scalar per layer and batch, so it never changes
   the order within a layer). Channels are ranked by `diff`, largest first, per layer.
2. CKA (`analy_backdoor_cka.py`): the same layers' outputs of the backdoored, the defense and the clean model
   on 500 poisoned test images (two shuffled batches of 250 of those triggered images); per layer, LINEAR CKA
   (`linear_CKA`: Gram matrices centred with H = I − 11ᵀ/n, HSIC = Σ (HKH)∘(HLH)) between the backdoored
   model's and the other model's activations of the layer's top 5 / 10 / 20 % channels (`int(C · p)`),
   flattened per image to [500, k·H·W].
3. BEC (`analy_backdoor_bec.py`, `analy_backdoor_plot.py`): each model's CKA is the mean over the layers;
   the plotted coefficient uses the top-10 % CKA, min-max normalised over the clean model and the defense
   models of one attack, with the backdoored model drawn at 1.

Here one purified model is audited at a time, so the normalisation cannot span all the defenses of an attack
[our choice]: its fixed points are the clean model (BEC 0) and the backdoored model itself (CKA 1, BEC 1):

    BEC = (CKA(f_bd, f_pur) − CKA(f_bd, f_clean)) / (1 − CKA(f_bd, f_clean)),

which equals the paper's when the clean model has the lowest CKA and the most similar defense is the
backdoored model itself; it is reported unclipped (negative: further from the backdoored model than a clean
one) and is None when the clean model's CKA is 1 (no reference to scale by).

Our further choices, since the official code is written for PreAct-ResNet-18 only: `layers="convs"` takes
every `nn.Conv2d` inside the model's block sequence (`models._common.named_blocks`) whose name has no
`shortcut`/`downsample` part, which for bdsafety's PreAct models and BackdoorBench's PreAct-ResNet-18 is
exactly the official set (stem excluded); a layer keeps at least one channel (`int(C · p)` is 0 below 10
channels); `layers="features"` uses only the channels of `features(x)` (the map before global pooling).
Fewer than 2,200 pairs or 500 images are used as they are (the counts are recorded). Linear CKA is defined
as 0 when either side has zero variance. The test set, not a training split, is used, as in the paper.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..attacks import map_uint8
from ..data import seed_for, to_float
from ..errors import UsageError
from ..models._common import named_blocks
from ..train import eval_batch_size, model_device
from ._common import AUDITS, AuditBase, AuditData, AuditedModel, AuditResult
from .reactivation import frozen

log = logging.getLogger(__name__)

LAYER_MODES = ("convs", "features")
PAIR_BATCH = 250  # analy_backdoor_acti.py: DataLoader batch_size=250 (diff is accumulated per batch)
SKIPPED_PARTS = ("shortcut", "downsample")  # analy_backdoor_acti.py: `"shortcut" not in name`
FEATURES = "features"  # the name of the one layer of layers="features"


def linear_cka(a: Tensor, b: Tensor) -> Tensor:
    """Linear CKA between two representations of the same n inputs, [n, ...] each (flattened per input).

    HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with K = a aᵀ, L = b bᵀ, both centred (HKH = a_c a_cᵀ for the
    column-centred a_c). Computed in float64; a 0-dim tensor in [0, 1], 0 when either side has zero variance.
    Invariant to isotropic scaling and orthogonal transforms of either side.
    """
    if len(a) != len(b):
        raise ValueError(f"linear_cka needs the same inputs on both sides, got {len(a)} and {len(b)}")
    a = a.reshape(len(a), -1).double()
    b = b.reshape(len(b), -1).double()
    a, b = a - a.mean(0, keepdim=True), b - b.mean(0, keepdim=True)
    k, l = a @ a.T, b @ b.T
    cross, self_a, self_b = (k * l).sum(), (k * k).sum(), (l * l).sum()
    if self_a <= 0 or self_b <= 0:
        return torch.zeros((), dtype=torch.float64, device=a.device)
    return cross / (self_a.sqrt() * self_b.sqrt())


def channel_difference(clean: Tensor, triggered: Tensor) -> Tensor:
    """One batch's `diff` per channel (preact_resnet_CLP.py, Conv2d_CLP): the mean over the pairs of the
    spatial L2 distance between a channel's clean and triggered maps, over the mean per-image L2 norm of the
    layer's whole output on both halves. clean, triggered: [n, C, H, W] → [C]."""
    n, c = clean.shape[:2]
    distance = (triggered - clean).reshape(n, c, -1).norm(dim=2).mean(0)
    scale = torch.cat([triggered, clean]).reshape(2 * n, -1).norm(dim=1).mean()
    return distance / scale.clamp_min(torch.finfo(distance.dtype).tiny)


def top_channels(diff: Tensor, fraction: float) -> Tensor:
    """The indices of the `int(C · fraction)` (at least one) channels of largest `diff`, largest first."""
    count = max(1, int(len(diff) * fraction))
    return torch.topk(diff, count).indices


def existence_coefficient(cka_purified: float, cka_clean: float) -> float | None:
    """(CKA_pur − CKA_clean) / (1 − CKA_clean): 0 for the clean model, 1 for the backdoored model itself;
    None when the clean reference has CKA 1 (within 1e-6)."""
    if 1 - cka_clean < 1e-6:
        return None
    return (cka_purified - cka_clean) / (1 - cka_clean)


def backdoor_layers(model: nn.Module, mode: str) -> list[str]:
    """The qualified names of the modules whose outputs hold the candidate neurons ("convs"), or
    [FEATURES] for the feature map (`features(x)`)."""
    if mode == "features":
        if not callable(getattr(model, "features", None)):
            raise UsageError(f"bec layers='features' needs features(x), which {type(model).__name__} lacks")
        return [FEATURES]
    try:
        blocks = named_blocks(model)
    except (UsageError, AttributeError) as exc:
        raise UsageError(f"bec layers='convs' needs a block sequence ({exc}); use layers='features'") from None
    names = [f"{prefix}.{name}" if name else prefix for prefix, block in blocks
             for name, module in block.named_modules()
             if isinstance(module, nn.Conv2d) and not any(part in name.split(".") for part in SKIPPED_PARTS)]
    if not names:
        raise UsageError(f"{type(model).__name__} has no convolution in its block sequence; use layers='features'")
    return names


@contextlib.contextmanager
def recording(model: nn.Module, names: list[str]) -> Iterator[dict[str, Tensor]]:
    """Inside the block, every forward of `model` stores the output of each module in `names` (by name) in
    the yielded dict; the hooks are removed after."""
    outputs: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def hook(module, args, output, name=name):
            outputs[name] = output.detach()
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def layer_outputs(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    """The outputs of `names` (or the feature map, for [FEATURES]) on the float [0, 1] images `x`, without
    gradients; call inside `frozen(model)` (eval mode)."""
    with torch.no_grad():
        if names == [FEATURES]:
            return {FEATURES: model.features(x)}
        with recording(model, names) as outputs:
            model(x)
        return dict(outputs)


@AUDITS.register("bec")
@dataclass(frozen=True)
class BackdoorExistence(AuditBase):
    """Backdoor Existence Coefficient: linear CKA of the backdoor neurons' activations on poisoned inputs
    between the backdoored and the purified model, scaled so a clean model gives 0 and the backdoored one 1."""

    fraction: float = 0.1  # analy_backdoor_plot.py key "top10_cka" (analy_backdoor_cka.py also has 0.05, 0.2)
    rank_pairs: int = 2200  # analy_backdoor_acti.py choise_sample bd_num: test pairs that rank the neurons
    cka_images: int = 500  # analy_backdoor_acti.py: 2 shuffled batches of 250 poisoned test images
    layers: str = "convs"  # analy_backdoor_acti.py: every block convolution ("Conv"); "features": features(x) only
    cpu_overrides: ClassVar[dict] = {}  # a few forward passes: cheap on every profile
    needs: ClassVar[tuple[str, ...]] = ("backdoored", "purified", "clean")

    def __post_init__(self):
        if not 0 < self.fraction <= 1 or self.rank_pairs < 1 or self.cka_images < 2:
            raise UsageError(f"bec needs 0 < fraction <= 1, rank_pairs >= 1 and cka_images >= 2, got {self}")
        if self.layers not in LAYER_MODES:
            raise UsageError(f"bec layers must be one of {', '.join(LAYER_MODES)}, got '{self.layers}'")

    def pairs(self, data: AuditData, seed: int) -> tuple[Tensor, Tensor]:
        """(clean, triggered) uint8 images: a seeded random `rank_pairs` of the test images whose attack label
        differs from their own, and the test trigger on them (as the triggered test set is built)."""
        if data.trigger is None:
            return self.given_pairs(data, seed)
        test = data.test
        candidates = (data.attack_labels(test.labels) != test.labels).nonzero().flatten()
        if len(candidates) < 2:
            raise UsageError(f"bec needs at least 2 non-target test images, found {len(candidates)}")
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed_for(seed, "bec-data")))
        chosen = candidates[order[:self.rank_pairs]]
        clean = test.images[chosen]
        return clean, map_uint8(data.trigger, clean)

    def given_pairs(self, data: AuditData, seed: int) -> tuple[Tensor, Tensor]:
        """A seeded random `rank_pairs` of the (clean, triggered) test pictures an outside source pairs (a
        BackdoorBench record's saved poisons and the clean test images they were made from)."""
        pairs = data.external.test_pairs if data.external is not None else None
        if pairs is None:
            raise UsageError("bec compares each test image with its triggered version, which poison folders do not "
                             "pair; use a trigger file or a BackdoorBench record, or drop bec")
        order = torch.randperm(len(pairs[0]), generator=torch.Generator().manual_seed(seed_for(seed, "bec-data")))
        chosen = order[:self.rank_pairs]
        return pairs[0][chosen], pairs[1][chosen]

    def rank(self, backdoored: nn.Module, names: list[str], clean: Tensor, triggered: Tensor) -> dict[str, Tensor]:
        """Each layer's `diff` per channel on the backdoored model, summed over batches of PAIR_BATCH pairs."""
        device, diff = model_device(backdoored), {}
        for start in range(0, len(clean), PAIR_BATCH):
            x_clean = to_float(clean[start:start + PAIR_BATCH].to(device))
            x_triggered = to_float(triggered[start:start + PAIR_BATCH].to(device))
            outputs = layer_outputs(backdoored, torch.cat([x_triggered, x_clean]), names)  # official order
            n = len(x_clean)
            for name, out in outputs.items():
                batch = channel_difference(out[n:].float(), out[:n].float())
                diff[name] = diff[name] + batch if name in diff else batch
        return diff

    def activations(self, model: nn.Module, names: list[str], selected: dict[str, Tensor], images: Tensor) -> dict:
        """The selected channels' activations of each layer on uint8 `images`, [n, k, H, W] on the model's device."""
        device = model_device(model)
        batch_size, kept = eval_batch_size(device), {name: [] for name in names}
        for start in range(0, len(images), batch_size):
            outputs = layer_outputs(model, to_float(images[start:start + batch_size].to(device)), names)
            for name in names:
                kept[name].append(outputs[name][:, selected[name].to(device)].float())
        return {name: torch.cat(chunks) for name, chunks in kept.items()}

    def unsupported(self, model: nn.Module) -> str | None:
        try:
            backdoor_layers(model, self.layers)
        except UsageError as exc:
            return str(exc)
        return None

    def run(self, models: Mapping[str, Any], data: AuditData, seed: int) -> AuditResult:
        """BEC of `models["purified"]` against `models["backdoored"]`, with `models["clean"]` as the zero point."""
        data.require_attack("bec")
        backdoored, purified, clean_model = models["backdoored"], models["purified"], models["clean"]
        started = time.perf_counter()
        names = backdoor_layers(backdoored, self.layers)
        clean, triggered = self.pairs(data, seed)
        poisoned = triggered[:self.cka_images]  # the pairs are in random order: a random subset of them
        with frozen(backdoored, purified, clean_model):
            diff = self.rank(backdoored, names, clean, triggered)
            selected = {name: top_channels(diff[name], self.fraction) for name in names}
            reference = self.activations(backdoored, names, selected, poisoned)
            others = {role: self.activations(models[role], names, selected, poisoned)
                      for role in ("purified", "clean")}
        layers = []
        for name in names:
            layers.append({"name": name, "channels": len(diff[name]), "selected": len(selected[name]),
                           "cka_purified": float(linear_cka(reference[name], others["purified"][name])),
                           "cka_clean": float(linear_cka(reference[name], others["clean"][name]))})
        cka_purified = sum(layer["cka_purified"] for layer in layers) / len(layers)
        cka_clean = sum(layer["cka_clean"] for layer in layers) / len(layers)
        result = {"bec": existence_coefficient(cka_purified, cka_clean), "cka_purified": cka_purified,
                  "cka_clean": cka_clean, "neurons": sum(layer["selected"] for layer in layers),
                  "layer_mode": self.layers, "layers": layers, "num_rank_pairs": len(clean),
                  "num_cka_images": len(poisoned), "duration_s": time.perf_counter() - started}
        log.info("bec: %s (cka purified %.4f, clean %.4f; %d neurons in %d layers, %.1fs)",
                 "n/a" if result["bec"] is None else f"{result['bec']:.4f}", cka_purified, cka_clean,
                 result["neurons"], len(layers), result["duration_s"])
        return AuditResult(result)

    @classmethod
    def card_fields(cls, metrics: dict) -> dict:
        return {"existence": metrics.get("bec")}

    def row_fields(self, metrics: dict, model: AuditedModel) -> dict:
        return {"bec": metrics["bec"]}
