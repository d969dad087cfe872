"""`create_model`: a registered architecture (`_common.MODELS`) or one from the user's own code,
`--model-factory package.module:function`.

The function is called like bdsafety's own model constructors, `function(in_channels, num_classes, mean,
std)`, and returns an `nn.Module` that takes float [0, 1] images (normalising them itself, e.g. through
`bdsafety.with_normalization`) and gives logits. It is registered as the model `factory:package.module:function`
for this process only: a run directory names its factory, but loading it needs the same flag again, so
reading a run directory never imports code on its own.
"""

from __future__ import annotations

import importlib
import re

from typing import Callable

from torch import nn

from ..errors import UsageError
from ._common import MODELS, ModelSpec

PREFIX = "factory:"
FACTORY_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
FACTORIES: dict[str, Callable[..., nn.Module]] = {}  # apart from MODELS: they are not bdsafety's architectures


def is_factory(name: str) -> bool:
    return name.startswith(PREFIX)


def register_factory(path: str) -> str:
    """Import `package.module:function` (this runs the user's module) and register it; returns the model name."""
    if not FACTORY_PATH.match(path):
        raise UsageError(f"--model-factory takes package.module:function, got '{path}'")
    module_name, function_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name} for --model-factory ({exc}); put its folder on PYTHONPATH "
                         f"or install it") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"{module_name} has no function {function_name} for --model-factory")
    FACTORIES[PREFIX + path] = function
    return PREFIX + path


def factory_of(name: str) -> Callable[..., nn.Module]:
    """The registered factory of model `name`, or a one-line error saying which flag registers it."""
    if name not in FACTORIES:
        raise UsageError(f"model '{name}' is built by your own code; pass --model-factory "
                         f"{name.removeprefix(PREFIX)} to load it (bdsafety never imports code named in a run "
                         "directory on its own)")
    return FACTORIES[name]


def create_model(spec: ModelSpec) -> nn.Module:
    """A new model of `spec`: a registered architecture, or one of the user's own (`factory:...`, registered by
    --model-factory for this process)."""
    constructor = factory_of(spec.name) if is_factory(spec.name) else MODELS.get(spec.name)
    return constructor(spec.in_channels, spec.num_classes, spec.mean, spec.std)


def check_model_name(name: str) -> None:
    """A one-line error unless `name` is a registered architecture or factory."""
    factory_of(name) if is_factory(name) else MODELS.get(name)
