"""Pure metric functions on prediction tensors (C-Acc, ASR: Min et al., NeurIPS 2024, Table 1). All return fractions
in [0, 1]."""

from __future__ import annotations

from torch import Tensor


def clean_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy on the whole clean test set."""
    return float((predictions == labels).float().mean()) if len(labels) else 0.0


def attack_success_rate(predictions: Tensor, target: int | Tensor) -> float:
    """Fraction of triggered test images classified as their attack label: `target` (an int for all-to-one, or
    one label per image)."""
    return float((predictions == target).float().mean()) if len(predictions) else 0.0


def relative_weight_distance(params: list[Tensor], reference: list[Tensor]) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref‖ over the concatenation of all tensors (one global L2 norm, as PAM measures it)."""
    diff = sum(float((p.detach().float() - r.detach().float().to(p.device)).pow(2).sum()) for p, r in zip(params, reference))
    norm = sum(float(r.detach().float().pow(2).sum()) for r in reference)
    return (diff / norm) ** 0.5 if norm > 0 else 0.0


def weight_distance(model, reference) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref‖ of two modules over their parameters (BN buffers excluded, as PAM's path)."""
    return relative_weight_distance(list(model.parameters()), list(reference.parameters()))
