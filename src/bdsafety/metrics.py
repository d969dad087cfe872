"""Pure metric functions on prediction tensors (ALGORITHMS §8). All return fractions in [0, 1]."""

from __future__ import annotations

from torch import Tensor


def clean_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy on the whole clean test set."""
    return float((predictions == labels).float().mean()) if len(labels) else 0.0


def attack_success_rate(predictions: Tensor, target: int) -> float:
    """Fraction of triggered non-target test images classified as the target."""
    return float((predictions == target).float().mean()) if len(predictions) else 0.0
