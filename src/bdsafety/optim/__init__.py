"""Optimizers that need a closure (two gradient evaluations per step): sharpness-aware minimization."""

from .sam import SAM, sam_perturbation

__all__ = ["SAM", "sam_perturbation"]
