"""Importing weights trained elsewhere: plain state dicts and BackdoorBench result files.

BackdoorBench (and the paper's official fork) name layers `conv1`, `layer{s}.{i}.*`, `linear`; bdsafety's
models nest them under `body.` with one flat `layers` list. `from_backdoorbench` renames the keys.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from . import store
from .errors import UsageError

log = logging.getLogger(__name__)

BLOCK_COUNTS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3), "preact_resnet18": (2, 2, 2, 2)}
BACKDOORBENCH_NAMES = {"preactresnet18": "preact_resnet18", "resnet18": "resnet18", "resnet50": "resnet50",
                       "vgg19_bn": "vgg19_bn"}
LAYER_KEY = re.compile(r"^layer(\d)\.(\d+)\.(.*)$")


def from_backdoorbench(state: dict[str, Tensor], model_name: str) -> dict[str, Tensor]:
    """Rename BackdoorBench keys to bdsafety's for the ResNet family."""
    if model_name not in BLOCK_COUNTS:
        raise UsageError(f"no BackdoorBench key mapping for '{model_name}'; supported: {', '.join(BLOCK_COUNTS)}")
    counts = BLOCK_COUNTS[model_name]
    preact = model_name.startswith("preact")
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("model.")
        renamed[rename_key(key, counts, preact)] = value
    return renamed


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


def read_backdoorbench(path: Path, trust_pickle: bool) -> tuple[dict[str, Tensor], str | None]:
    """The model state dict (and architecture name) of a BackdoorBench `attack_result.pt`/`defense_result.pt`.

    Such files also pickle numpy arrays and dataset objects, which `weights_only` refuses; loading them
    in full runs arbitrary code from the file, so it needs `trust_pickle=True`.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        if not trust_pickle:
            raise UsageError(f"{path} needs full unpickling, which can run code from the file; pass "
                             "--trust-pickle only if you trust its source") from None
        log.warning("unpickling %s in full (--trust-pickle): this runs any code the file carries", path)
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(loaded, dict):
        raise UsageError(f"{path} is not a BackdoorBench result (expected a dict)")
    state = loaded.get("model", loaded)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(f"{path} holds no model state dict under 'model'")
    name = loaded.get("model_name")
    return state, BACKDOORBENCH_NAMES.get(name, name) if isinstance(name, str) else None


def read_any(path: Path, fmt: str, model_name: str, trust_pickle: bool) -> dict[str, Tensor]:
    """Weights in bdsafety key names from a `state_dict` (.safetensors/.pt) or `backdoorbench` file."""
    if fmt == "state_dict":
        return store.read_state_dict(path)
    state, named = read_backdoorbench(path, trust_pickle)
    if named is not None and named != model_name:
        raise UsageError(f"{path} holds a '{named}' model but --model is '{model_name}'; pass --model {named}")
    return from_backdoorbench(state, model_name)
