"""Attack registry: one file per attack; poisoning is the one generic function in _common.

Attacks that must be fitted first (SSBA, LC, LF, TrojanNN) go through `fit_attack`, which caches their assets by
content hash (`_assets.py`). Their `cpu_overrides` (a ClassVar dict) scale fit lengths for the CPU
profile, as for defenses and audits; the algorithm is never changed. Build one with
`ATTACKS.create(name, profile, **params)`. Every dirty-label attack poisons all-to-one (to the target) or
all-to-all (class y to (y + 1) mod C), the spec's `labels` policy.
"""

from ._common import (ATTACKS, LABEL_POLICIES, Attack, PoisonedSet, attack_labels, check_poisoning, map_uint8, poison,
                      triggered_test_set)
from ._assets import fit_attack, fit_report
from . import adap_blend, badnets, blended, bpp, input_aware, lc, lf, sig, ssba, trojannn, wanet  # noqa: F401  (registration)

__all__ = ["ATTACKS", "LABEL_POLICIES", "Attack", "PoisonedSet", "attack_labels", "check_poisoning", "fit_attack",
           "fit_report", "map_uint8", "poison", "triggered_test_set"]
