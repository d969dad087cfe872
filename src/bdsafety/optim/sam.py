"""Sharpness-aware minimization (Foret et al., 2021, arXiv 2010.01412) and its adaptive form ASAM
(Kwon et al., 2021, arXiv 2102.11600), as used by FT-SAM (official `defense/ft-sam.py`).

One step: gradient g at θ; move to θ + e with e = ρ·g/‖g‖ (SAM) or e = ρ·g⊙θ²/‖|θ|⊙g‖ (ASAM);
gradient g' there with BatchNorm running statistics frozen; back to θ; the base optimizer steps with g'.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

EPS = 1e-12  # official code's guard against a zero gradient norm


def sam_perturbation(params: list[Tensor], grads: list[Tensor], rho: float, adaptive: bool) -> list[Tensor]:
    """The ascent step e for each parameter (pure; one global norm over all tensors).

    Args:
        params: parameter values θ_i.
        grads: their gradients g_i (same shapes).
        rho: radius ρ of the neighbourhood.
        adaptive: ASAM's element-wise |θ| scaling.
    Returns:
        e_i = ρ·g_i/‖g‖ or, adaptive, ρ·θ_i²⊙g_i/‖|θ|⊙g‖.
    """
    scaled = [(p.abs() * g) if adaptive else g for p, g in zip(params, grads)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled])) if scaled else 0.0
    scale = rho / (norm + EPS)
    return [(p.pow(2) * g if adaptive else g) * scale for p, g in zip(params, grads)]


def batch_norms(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    return (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm layers keep normalising with batch statistics but do not update their running statistics."""
    saved = [(bn, bn.momentum, bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None)
             for bn in batch_norms(model)]
    for bn, _, _ in saved:
        bn.momentum = 0.0  # running = (1 - 0)·running + 0·batch: unchanged (also for momentum=None layers)
    try:
        yield
    finally:
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)


class SAM(torch.optim.Optimizer):
    """(A)SAM wrapper around a base optimizer; `step(closure)` evaluates the loss twice.

    The wrapper shares its `param_groups` with the base optimizer, so LR schedulers built on the
    wrapper drive the base optimizer's learning rate.

    Args:
        model: the module being trained (its parameters are optimized; its BatchNorm layers are found here).
        base_optimizer: optimizer class, e.g. `torch.optim.SGD`.
        rho: neighbourhood radius ρ (FT-SAM: 2.0 with `adaptive=True`).
        adaptive: ASAM (element-wise |θ| scaling) instead of SAM.
        **base_kwargs: the base optimizer's arguments (lr, momentum, weight_decay, ...).
    """

    needs_closure = True

    def __init__(self, model: nn.Module, base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, adaptive: bool = False, **base_kwargs):
        if rho < 0:
            raise ValueError(f"SAM radius rho must be >= 0, got {rho}")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(base_kwargs))
        self.model, self.rho, self.adaptive = model, rho, adaptive
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def perturb(self) -> list[tuple[Tensor, Tensor]]:
        """Move every parameter with a gradient to θ + e (one global norm); returns (parameter, saved θ) pairs."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        saved = [(p, p.detach().clone()) for p in params]
        for p, e in zip(params, sam_perturbation(params, [p.grad for p in params], self.rho, self.adaptive)):
            p.add_(e)
        return saved

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """closure: zeroes grads, computes the loss and calls backward. Returns the loss at θ."""
        if closure is None:
            raise ValueError("SAM needs a closure that recomputes the loss")
        with torch.enable_grad():
            loss = closure()
        saved = self.perturb()
        with torch.enable_grad(), frozen_bn_stats(self.model):
            closure()
        with torch.no_grad():
            for p, theta in saved:
                p.copy_(theta)  # exact restore; θ + e - e can differ in the last bit
        self.base_optimizer.step()
        return loss
