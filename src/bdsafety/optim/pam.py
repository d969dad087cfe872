"""Path-Aware Minimization (Min et al., NeurIPS 2024, arXiv 2410.09838, §5; official `fine_tune/BTIDBF/sam.py::PAM`).

PAM approximately minimises L(θ + ρ·(θ_bd − θ)/‖θ_bd − θ‖): the loss is evaluated a fixed distance ρ
from the current weights *toward* the backdoored weights θ_bd, and that gradient updates the
undisplaced weights (the displacement is a constant, as in SAM). One forward/backward per step.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


class PAM(torch.optim.Optimizer):
    """SGD (or another base optimizer) on the gradient taken at the point displaced toward θ_bd.

    θ_bd is a frozen copy of the parameters at construction time (or `reference`): parameters only,
    never BN buffers. Per step: d = θ_bd − θ over all parameters, one global L2 norm, θ̂ = θ + ρ·d/(‖d‖ +
    1e-12) in place, loss = closure() at θ̂ (BN running statistics updated there are kept, as in the
    official code), θ restored bit-exactly, then the base step with that gradient. At θ = θ_bd, d = 0 and
    the step is the base optimizer's step.

    Args:
        params: the model's parameters.
        rho: displacement radius toward θ_bd (paper: 0.5, from the repository's shell script
            `fine_tune/BTIDBF/defense.sh`; no argparse default).
        base_optimizer: class of the base optimizer (paper: SGD, lr 0.01, momentum 0.1, wd 0, hard-coded in
            `fine_tune/BTIDBF/btidbfu.py`).
        reference: θ_bd tensors in the order of `params`; default: a copy of `params` now.
        **base_kwargs: passed to the base optimizer.
    """

    needs_closure = True

    def __init__(self, params: Iterable[Tensor], rho: float = 0.5, base_optimizer: type = torch.optim.SGD,
                 reference: Iterable[Tensor] | None = None, **base_kwargs):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, **base_kwargs))
        # The base optimizer shares our param_groups, so LR schedulers and zero_grad act on both.
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.rho = rho
        params = self._params()
        source = params if reference is None else list(reference)
        if len(source) != len(params) or any(r.shape != p.shape for r, p in zip(source, params)):
            raise ValueError("reference must hold one tensor per parameter, with matching shapes")
        self.reference = [r.detach().to(p.device, p.dtype, copy=True) for r, p in zip(source, params)]

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def displacement(self, params: list[Tensor]) -> list[Tensor]:
        """ρ·(θ_bd − θ)/(‖θ_bd − θ‖ + 1e-12) per parameter tensor, with one global norm."""
        shift = torch._foreach_sub(self.reference, params)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(shift)))
        torch._foreach_mul_(shift, self.rho / (norm + 1e-12))
        return shift

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One PAM update; `closure` must zero the grads, compute the loss, call backward and return it."""
        if closure is None:
            raise ValueError("PAM needs a closure that recomputes the loss")
        params = self._params()
        saved = torch._foreach_clone(params)
        torch._foreach_add_(params, self.displacement(params))
        with torch.enable_grad():
            loss = closure()
        torch._foreach_copy_(params, saved)
        self.base_optimizer.step()
        return loss

    def distance(self) -> float:
        """‖θ − θ_bd‖ over all parameters (global L2)."""
        with torch.no_grad():
            diffs = torch._foreach_sub(self._params(), self.reference)
            return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs))))
