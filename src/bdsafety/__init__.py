"""bdsafety: backdoor attacks, purification defenses and superficial-safety audits for image classifiers.

`bdsafety.audit(purified, backdoored, poisons=..., ...)` audits model objects of any architecture against the
attacker's own poisons: `PoisonFolders`, `TriggerFile` or `BackdoorBenchPoisons` (see `bdsafety.api`).
"""

__version__ = "0.2.0"
__all__ = ["audit", "with_normalization", "PoisonFolders", "TriggerFile", "BackdoorBenchPoisons", "__version__"]

LAZY = {"audit": "api", "with_normalization": "api", "PoisonFolders": "poisons", "TriggerFile": "poisons",
        "BackdoorBenchPoisons": "poisons"}


def __getattr__(name: str):
    """The API's names, imported on first use: `import bdsafety` alone stays light (no torch)."""
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bdsafety' has no attribute {name!r}")
