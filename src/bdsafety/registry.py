"""The name -> constructor registry of every method family (models, attacks, defenses, audits).

`create(name, profile, shared, **params)` is the one way a method is built: the profile's settings first
(a class's `cpu_overrides` on the CPU profile), then shared settings the constructor takes (e.g. the
backdoored model's training augmentation), then the user's parameters, which must all be known.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from .errors import UsageError

PROFILES = ("paper", "cpu")  # paper: the authors' defaults; cpu: lengths scaled for 2 cores (docs/reproducing.md)


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise UsageError(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILES)}")
    return profile


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

    def profile_params(self, name: str, profile: str = "paper") -> dict:
        """The parameters profile `profile` sets for `name` (the CPU profile's `cpu_overrides`; else none)."""
        check_profile(profile)
        return dict(getattr(self.get(name), "cpu_overrides", {})) if profile == "cpu" else {}

    def create(self, name: str, profile: str = "paper", shared: dict | None = None, **params: Any) -> Any:
        """Build `name` for `profile` with `shared` settings it takes, then `params`; an unknown parameter is a
        UsageError naming the valid ones."""
        constructor = self.get(name)
        valid = parameter_names(constructor)
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise UsageError(
                f"{self.family} '{name}' has no parameter {', '.join(unknown)}; "
                f"valid: {', '.join(valid) or '(none)'}"
            )
        base = {**self.profile_params(name, profile), **known_parameters(constructor, shared)}
        return constructor(**{**base, **params})

    def names(self) -> list[str]:
        return sorted(self._entries)

    def name_of(self, obj: Any) -> str:
        """The name `obj` (a registered constructor or an instance of a registered class) is registered under."""
        for name, entry in self._entries.items():
            if entry is obj or (isinstance(entry, type) and type(obj) is entry):
                return name
        return type(obj).__name__

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
