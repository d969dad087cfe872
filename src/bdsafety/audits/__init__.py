"""Superficial-safety audits (ALGORITHMS §5-7): measurements on the test set, never defenses.

Audit contract: a frozen dataclass whose fields are its hyperparameters (paper defaults, with the
source in a comment) and a `run(...)` method that never modifies the models it is given and returns
a JSON-able dict (fractions in [0, 1], losses, timings). `cpu_overrides` (a ClassVar dict) scales
lengths (epochs) for the Fashion-MNIST CPU profile; the algorithm is never changed.
"""

from ..errors import UsageError
from ..registry import Registry, known_parameters

AUDITS = Registry("audit")
PROFILES = ("paper", "cpu")

# The modules register themselves in AUDITS, so they are imported after it exists.
from .connectivity import LinearModeConnectivity, interpolate_state  # noqa: E402
from .reactivation import QueryReactivation  # noqa: E402
from .retuning import Retuning  # noqa: E402
from .trajectory import DefenseTrajectory  # noqa: E402


def create_audit(name: str, profile: str = "paper", augmentation: dict | None = None, **overrides):
    """Build audit `name` with the profile's lengths, the backdoored model's training augmentation (RA's
    clean images), then user overrides (`--set key=value`)."""
    if profile not in PROFILES:
        raise UsageError(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILES)}")
    cls = AUDITS.get(name)
    params = {**(cls.cpu_overrides if profile == "cpu" else {}), **known_parameters(cls, augmentation), **overrides}
    return AUDITS.create(name, **params)


__all__ = ["AUDITS", "PROFILES", "DefenseTrajectory", "LinearModeConnectivity", "QueryReactivation", "Retuning", "create_audit",
           "interpolate_state"]
