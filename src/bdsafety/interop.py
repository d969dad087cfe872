"""Weights trained elsewhere, in and out: plain state dicts and BackdoorBench result files.

BackdoorBench's `attack_result.pt` / `defense_result.pt` are `torch.save`d dicts: the model's state dict
beside the poisoned data's bookkeeping (numpy arrays, numpy integer keys and, for data kept in memory, PIL
images). They are read with torch's weights-only unpickler, which admits tensors and plain containers,
extended by exactly those numpy types and by a stand-in for PIL images that only keeps the pickled bytes:
nothing from the file runs, and any other object makes the file refused.

BackdoorBench's own architectures load with their key names unchanged (`models/backdoorbench.py`,
`models/torchvision_style.py`, `convnext.py`, `efficientnet.py`, `vit.py`) once the prefixes of wrappers are
dropped (DataParallel's `module.`; for `vit_b_16`, the `1.` of BackdoorBench's `Sequential(Resize, net)`) and
a ViT saved with torchvision < 0.14 has its MLP keys renamed as torchvision renames them; the paper
repository's CIFAR-style ResNets name layers `conv1`, `layer{s}.{i}.*`, `linear`, which `from_backdoorbench`
renames into bdsafety's `body.` nesting.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import store
from .errors import UsageError
from .models.backdoorbench import WRAPPER_PREFIXES, backdoorbench_architecture, unwrapped_key

BLOCK_COUNTS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3), "preact_resnet18": (2, 2, 2, 2)}
LAYER_KEY = re.compile(r"^layer(\d)\.(\d+)\.(.*)$")
# BackdoorBench's dataset names (`clean_data`) -> bdsafety's.
BACKDOORBENCH_DATASETS = {"mnist": "mnist", "cifar10": "cifar10", "cifar100": "cifar100", "gtsrb": "gtsrb",
                          "tiny": "tiny-imagenet"}


def from_backdoorbench(state: dict[str, Tensor], model_name: str) -> dict[str, Tensor]:
    """Rename CIFAR-style ResNet keys (`conv1`, `layer{s}.{i}.*`, `linear`) to bdsafety's nesting."""
    if model_name not in BLOCK_COUNTS:
        raise UsageError(f"no BackdoorBench key mapping for '{model_name}'; supported: {', '.join(BLOCK_COUNTS)}")
    counts = BLOCK_COUNTS[model_name]
    preact = model_name.startswith("preact")
    return {rename_key(key, counts, preact): value for key, value in strip_wrappers(state).items()}


def to_backdoorbench(state: dict[str, Tensor], model_name: str) -> dict[str, Tensor]:
    """The inverse of `from_backdoorbench`: bdsafety's CIFAR-style ResNet keys in the paper repository's names."""
    if model_name not in BLOCK_COUNTS:
        raise UsageError(f"no BackdoorBench key mapping for '{model_name}'; supported: {', '.join(BLOCK_COUNTS)}")
    counts = BLOCK_COUNTS[model_name]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    renamed = {}
    for key, value in state.items():
        if key.startswith("body.layers."):
            flat, rest = key[len("body.layers."):].split(".", 1)
            stage = max(i for i, start in enumerate(starts) if start <= int(flat))
            if model_name.startswith("preact"):
                rest = rest.replace("shortcut.", "shortcut.0.")
            key = f"layer{stage + 1}.{int(flat) - starts[stage]}.{rest}"
        elif key.startswith("body.stem."):
            key = "conv1." + key[len("body.stem."):]
        renamed[key.removeprefix("body.")] = value
    return renamed


def strip_wrappers(state: dict[str, Tensor], model_name: str | None = None) -> dict[str, Tensor]:
    """Keys without the `module.` (DataParallel) and `model.` prefixes that training wrappers add, and without
    the one BackdoorBench's own wrapper of `model_name` adds (`vit_b_16`: `1.`, after its Resize)."""
    return {unwrapped_key(key, model_name): value for key, value in state.items()}


# torchvision < 0.14 (BackdoorBench's sh/install.sh pins 0.12) named a ViT block's MLP layers `linear_1`, `linear_2`;
# later versions, and bdsafety, `0`, `3` (pytorch/vision#6053, whose ViT renames old keys the same way on loading).
LEGACY_VIT_MLP = re.compile(r"^(encoder\.layers\.encoder_layer_\d+\.mlp\.)linear_([12])\.")


def current_vit_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ViT state dict with its MLP layers named as torchvision >= 0.14 names them."""
    def renamed(key: str) -> str:
        return LEGACY_VIT_MLP.sub(lambda m: f"{m[1]}{3 * (int(m[2]) - 1)}.", key)

    return {renamed(key): value for key, value in state.items()}


def rename_key(key: str, counts: tuple[int, ...], preact: bool) -> str:
    match = LAYER_KEY.match(key)
    if match:
        stage, index, rest = int(match[1]), int(match[2]), match[3]
        flat = sum(counts[:stage - 1]) + index
        if preact:
            rest = rest.replace("shortcut.0.", "shortcut.")
        return f"body.layers.{flat}.{rest}"
    if key.startswith("linear."):
        return key
    if preact:
        return f"body.stem.{key.split('.', 1)[1]}" if key.startswith("conv1.") else f"body.{key}"
    return f"body.{key}"


class PickledImage:
    """Stands in for `PIL.Image.Image` while unpickling: keeps the pickled (info, mode, size, palette, bytes)
    without calling any PIL code."""

    def __setstate__(self, state) -> None:
        self.state = state


NUMERIC_DTYPES = ("BoolDType", "Int8DType", "UInt8DType", "Int16DType", "UInt16DType", "Int32DType", "UInt32DType",
                  "Int64DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType")


def backdoorbench_globals() -> list:
    """What a BackdoorBench result pickles beyond tensors and containers: numpy arrays and scalars (under
    numpy 1's and numpy 2's module names), their numeric dtypes, and PIL images (as `PickledImage`)."""
    core = getattr(np, "_core", None) or np.core
    admitted: list = [np.ndarray, np.dtype, (PickledImage, "PIL.Image.Image")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        admitted += [(core.multiarray._reconstruct, f"{module}._reconstruct"),
                     (core.multiarray.scalar, f"{module}.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    return admitted + [getattr(dtypes, name) for name in NUMERIC_DTYPES if dtypes is not None and hasattr(dtypes, name)]


REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


def load_restricted(path: Path) -> object:
    """`torch.load` of a BackdoorBench result with only `backdoorbench_globals` admitted beyond weights (read once
    per process while the file is unchanged: an audit of a record reads its attack_result.pt in several places).
    The result is shared: never modify it."""
    if not path.is_file():
        raise UsageError(f"{path} not found; pass BackdoorBench's attack_result.pt or defense_result.pt")
    stat = path.stat()
    return cached_load(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def cached_load(path: Path, mtime_ns: int, size: int) -> object:
    try:
        with torch.serialization.safe_globals(backdoorbench_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refusals of the restricted unpickler and corrupt archives alike
        found = REFUSED_GLOBAL.search(str(exc))
        if found:
            raise UsageError(f"refusing to load {path}: it carries the global '{found[1] or found[2]}', which "
                             "BackdoorBench's result files never hold (nothing from the file was run)") from None
        raise UsageError(f"cannot read {path} as a BackdoorBench result ({type(exc).__name__}); the file is "
                         "corrupt or truncated, or not a torch.save file") from None


@dataclass(frozen=True)
class BackdoorBenchResult:
    """What bdsafety takes from a BackdoorBench result file."""

    state: dict[str, Tensor]
    model_name: str | None
    num_classes: int | None
    dataset: str | None  # bdsafety's name of `clean_data`
    poisoned_train: int | None  # how many training samples the attack poisoned, when the file says

    def details(self) -> dict:
        return {"backdoorbench_model_name": self.model_name, "backdoorbench_num_classes": self.num_classes,
                "backdoorbench_dataset": self.dataset, "backdoorbench_poisoned_train": self.poisoned_train}


def read_backdoorbench(path: Path) -> BackdoorBenchResult:
    """The model of a BackdoorBench `attack_result.pt` / `defense_result.pt`, read without running code."""
    loaded = load_restricted(path)
    if not isinstance(loaded, dict):
        raise UsageError(f"{path} is not a BackdoorBench result (expected a dict, found {type(loaded).__name__})")
    state = loaded.get("model")
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(f"{path} holds no model state dict under 'model'; is it attack_result.pt or "
                         "defense_result.pt?")
    name, classes, data = loaded.get("model_name"), loaded.get("num_classes"), loaded.get("clean_data")
    name = name if isinstance(name, str) else None
    return BackdoorBenchResult(current_vit_keys(strip_wrappers(state, name)), name,
                               int(classes) if isinstance(classes, (int, np.integer)) else None,
                               BACKDOORBENCH_DATASETS.get(data, data) if isinstance(data, str) else None,
                               poisoned_count(loaded.get("bd_train")))


def poisoned_count(bd_train) -> int | None:
    """The number of poisoned samples in BackdoorBench's saved `bd_train` state (`poison_indicator` sums them)."""
    indicator = bd_train.get("poison_indicator") if isinstance(bd_train, dict) else None
    return int(np.asarray(indicator).sum()) if isinstance(indicator, (np.ndarray, list)) else None


def read_any(path: Path, fmt: str, model_name: str | None) -> tuple[dict[str, Tensor], str, dict]:
    """(weights in bdsafety key names, architecture, details for the record) from a `state_dict`
    (.safetensors/.pt) or a `backdoorbench` file; a BackdoorBench file names its own architecture."""
    if fmt == "state_dict":
        if model_name is None:
            raise UsageError("a plain state dict does not name its architecture; pass --model")
        return store.read_state_dict(path), model_name, {}
    result = read_backdoorbench(path)
    if result.model_name is None:
        if model_name is None:
            raise UsageError(f"{path} does not name its architecture (no 'model_name'); pass --model")
        chosen, renamed = model_name, model_name in BLOCK_COUNTS
    else:
        chosen, renamed = backdoorbench_architecture(result.model_name, set(result.state))
        if model_name is not None and model_name != chosen:
            raise UsageError(f"{path} holds a BackdoorBench '{result.model_name}', which is bdsafety's '{chosen}', "
                             f"but --model is '{model_name}'; drop --model or pass --model {chosen}")
    state = from_backdoorbench(result.state, chosen) if renamed else result.state
    return state, chosen, result.details()


# bdsafety architecture -> BackdoorBench's `model_name`, for models whose keys need no renaming.
BACKDOORBENCH_EXPORTS = {"preact_resnet18_backdoorbench": "preactresnet18", "resnet18_torchvision": "resnet18",
                         "vgg19_bn_torchvision": "vgg19_bn", "densenet161_torchvision": "densenet161",
                         "mobilenet_v3_large_torchvision": "mobilenet_v3_large",
                         "convnext_tiny_torchvision": "convnext_tiny", "vit_b_16_torchvision": "vit_b_16",
                         "efficientnet_b3_torchvision": "efficientnet_b3"}


def backdoorbench_export(state: dict[str, Tensor], model_name: str, num_classes: int) -> dict:
    """A `defense_result.pt` dict (BackdoorBench's `save_defense_result` layout) holding a bdsafety model.

    The paper repository's CIFAR-style `resnet18` (bdsafety's `resnet18`) is exported in its key names; in
    BackdoorBench itself `resnet18` is torchvision's (`resnet18_torchvision`). Models normalise their own
    input in bdsafety and in a BackdoorBench data transform; both use the dataset's mean and std. A ViT's keys
    get the prefix of BackdoorBench's resize wrapper (`1.`) and torchvision >= 0.14's MLP names (`mlp.0`/`mlp.3`;
    BackdoorBench on torchvision 0.12 names them `mlp.linear_1`/`mlp.linear_2`)."""
    if model_name in BACKDOORBENCH_EXPORTS:
        theirs = BACKDOORBENCH_EXPORTS[model_name]
        renamed = {WRAPPER_PREFIXES.get(theirs, "") + key: value for key, value in state.items()}
    elif model_name == "resnet18":
        theirs, renamed = "resnet18", to_backdoorbench(state, model_name)
    else:
        known = ", ".join([*BACKDOORBENCH_EXPORTS, "resnet18"])
        raise UsageError(f"'{model_name}' has no BackdoorBench counterpart; export one of: {known}")
    return {"model_name": theirs, "num_classes": int(num_classes),
            "model": {key: value.detach().cpu().contiguous() for key, value in renamed.items()}}
