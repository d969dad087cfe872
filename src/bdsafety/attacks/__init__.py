"""Attack registry: one file per attack; poisoning is the one generic function in _common.

Attacks that must be fitted first (SSBA, LC) go through `fit_attack`, which caches their assets by
content hash (`_assets.py`). Their `cpu_overrides` (a ClassVar dict) scale fit lengths for the CPU
profile, as for defenses and audits; the algorithm is never changed. Build one with
`ATTACKS.create(name, profile, **params)`.
"""

from ._common import ATTACKS, Attack, PoisonedSet, check_poisoning, map_uint8, poison, triggered_test_set
from ._assets import fit_attack, fit_report
from . import badnets, blended, lc, sig, ssba, wanet  # noqa: F401  (registration)

__all__ = ["ATTACKS", "Attack", "PoisonedSet", "check_poisoning", "fit_attack", "fit_report", "map_uint8", "poison",
           "triggered_test_set"]
