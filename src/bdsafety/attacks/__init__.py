"""Attack registry: one file per attack; poisoning is the one generic function in _common."""

from ._common import ATTACKS, Attack, PoisonedSet, map_uint8, poison, triggered_test_set
from . import badnets, blended, sig, wanet  # noqa: F401  (registration)


def create_attack(name: str, **params) -> Attack:
    return ATTACKS.create(name, **params)


__all__ = ["ATTACKS", "Attack", "PoisonedSet", "create_attack", "map_uint8", "poison", "triggered_test_set"]
