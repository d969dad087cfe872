"""Attack registry: one file per attack; poisoning is the one generic function in _common.

Attacks that must be fitted first (SSBA, LC) go through `fit_attack`, which caches their assets by
content hash (`_assets.py`). Their `cpu_overrides` (a ClassVar dict) scale fit lengths for the CPU
profile, as for defenses and audits; the algorithm is never changed.
"""

from ._common import ATTACKS, Attack, PoisonedSet, check_poisoning, map_uint8, poison, triggered_test_set
from ._assets import default_cache_dir, fit_attack, fit_report
from . import badnets, blended, lc, sig, ssba, wanet  # noqa: F401  (registration)
from ..errors import UsageError

PROFILES = ("paper", "cpu")


def profile_overrides(name: str, profile: str = "paper") -> dict:
    """The parameters the profile sets for attack `name` (the CPU profile's scaled fit lengths; else {})."""
    if profile not in PROFILES:
        raise UsageError(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILES)}")
    return dict(getattr(ATTACKS.get(name), "cpu_overrides", {})) if profile == "cpu" else {}


def create_attack(name: str, profile: str = "paper", **params) -> Attack:
    """Build attack `name` with the profile's lengths, then the user's parameters (`--set key=value`)."""
    return ATTACKS.create(name, **{**profile_overrides(name, profile), **params})


__all__ = ["ATTACKS", "Attack", "PoisonedSet", "check_poisoning", "create_attack", "default_cache_dir", "fit_attack",
           "fit_report", "map_uint8", "poison", "profile_overrides", "triggered_test_set"]
