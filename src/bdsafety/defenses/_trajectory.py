"""Where a defense run has got to: the model after given fractions of its optimizer steps.

`StepSnapshots` watches every optimizer step taken while a defense runs (torch's global step hooks),
counts those that update the purified model's own parameters (a wrapper such as SAM or PAM counts once,
not once more for its base optimizer; steps on generators, masks or copies are not counted) and keeps
copies of the model's state at evenly spaced steps. The run's length is known only at its end, so it
keeps at most `capacity` copies: when full, every other one is dropped and the spacing doubles. The
state after any fraction f of the run is then the kept one nearest to f, within 2 / capacity of the run
(the fraction actually reached is recorded).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

DEFAULT_CAPACITY = 64


class StepSnapshots:
    """Context manager: counts the optimizer steps that update `model` and keeps spaced copies of its state."""

    def __init__(self, model: nn.Module, keep: bool = True, capacity: int = DEFAULT_CAPACITY):
        self.model, self.keep, self.capacity = model, keep, capacity
        self.param_ids = {id(p) for p in model.parameters()}
        self.steps, self.stride, self.depth = 0, 1, 0
        self.kept: dict[int, dict[str, Tensor]] = {}
        self.handles = []

    def __enter__(self) -> "StepSnapshots":
        self.handles = [register_optimizer_step_pre_hook(self._before), register_optimizer_step_post_hook(self._after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _before(self, optimizer, args, kwargs) -> None:
        self.depth += 1

    def _after(self, optimizer, args, kwargs) -> None:
        self.depth -= 1
        if self.depth > 0 or not self._updates_model(optimizer):
            return  # a base optimizer inside SAM/PAM, or an optimizer of something else
        self.steps += 1
        if self.keep and self.steps % self.stride == 0:
            self.kept[self.steps] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            if len(self.kept) > self.capacity:
                self.stride *= 2
                self.kept = {s: state for s, state in self.kept.items() if s % self.stride == 0}

    def _updates_model(self, optimizer) -> bool:
        return any(id(p) in self.param_ids for group in optimizer.param_groups for p in group["params"])

    def states_at(self, fractions: list[float]) -> list[tuple[dict, dict[str, Tensor]]]:
        """For each fraction in (0, 1) the kept state nearest to it: ({"fraction", "step"}, state)."""
        if not self.kept:
            return []
        out = []
        for fraction in fractions:
            step = min(self.kept, key=lambda s: abs(s - fraction * self.steps))
            out.append(({"fraction": step / self.steps, "step": step}, self.kept[step]))
        return out


def trajectory_fractions(points: int) -> list[float]:
    """The interior fractions of `points` evenly spaced points ending at the full run: 5 -> 0.2, ..., 0.8."""
    return [i / points for i in range(1, points)]
