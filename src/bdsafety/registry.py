"""A small name -> constructor registry shared by every method family."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from .errors import UsageError


class Registry:
    """Maps lowercase names to constructors (classes or functions)."""

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable:
        def decorator(obj):
            if name in self._entries:
                raise RuntimeError(f"{self.family} '{name}' registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise UsageError(
                f"unknown {self.family} '{name}'; choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]

    def create(self, name: str, **params: Any) -> Any:
        """Build `name` with `params`; an unknown parameter is a UsageError naming the valid ones."""
        constructor = self.get(name)
        valid = parameter_names(constructor)
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise UsageError(
                f"{self.family} '{name}' has no parameter {', '.join(unknown)}; "
                f"valid: {', '.join(valid) or '(none)'}"
            )
        return constructor(**params)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def known_parameters(constructor: Callable, values: dict | None) -> dict:
    """The entries of `values` that `constructor` takes (shared settings such as the training augmentation)."""
    valid = set(parameter_names(constructor))
    return {k: v for k, v in (values or {}).items() if k in valid}


def parameter_names(constructor: Callable) -> list[str]:
    if dataclasses.is_dataclass(constructor):
        return [f.name for f in dataclasses.fields(constructor) if f.init]
    signature = inspect.signature(constructor)
    return [p for p in signature.parameters if p not in ("self",)]
