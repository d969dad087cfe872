"""bdsafety: backdoor attacks, purification defenses and superficial-safety audits for image classifiers.

`bdsafety.audit(purified, backdoored, ...)` audits model objects of any architecture (see `bdsafety.api`).
"""

__version__ = "0.2.0"
__all__ = ["audit", "with_normalization", "__version__"]


def __getattr__(name: str):
    """The API's functions, imported on first use: `import bdsafety` alone stays light (no torch)."""
    if name in ("audit", "with_normalization"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'bdsafety' has no attribute {name!r}")
