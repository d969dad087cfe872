"""The Python API: audit model objects you built yourself, of any architecture.

    import bdsafety
    report = bdsafety.audit(purified, backdoored, data="fashion-mnist", attack="badnets", checks=("ra", "lmc"))

The models need only `forward`: they take float [0, 1] images of the dataset's shape (wrap a model that
expects normalised input with `with_normalization`) and give logits. The attack's trigger, the poisons
and the test sets are rebuilt from (data, attack, seed) exactly as `bdsafety train` builds them, so the
models must have been trained on that dataset and attacked with that trigger for the audit to mean
anything.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .audits import create_audits, single_shot
from .audits.verdict import verdict_card
from .errors import UsageError
from .pipeline import stages
from .pipeline.setup import Setup, evaluate_setup, prepare
from .pipeline.specs import AttackSpec, DataSpec
from .profiles import default_profile
from .store import Record, Stage
from .train import resolve_device


class Standardize:
    """A forward pre-hook: (x - mean) / std per channel, on the input's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(tuple(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return ((x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype), *args[1:])


def with_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """`model` itself, made to take [0, 1] images: a forward pre-hook applies (x - mean) / std first. Its
    state dict keeps its keys, so checkpoints of the model load into it unchanged."""
    model.register_forward_pre_hook(Standardize(mean, std))
    return model


def setup_for(data: str | DataSpec, attack: str | AttackSpec, seed: int = 0, data_dir: str | None = None,
              device: str | torch.device = "cpu", **attack_settings) -> Setup:
    """The data, split, fitted trigger, poisons and triggered test set of (data, attack, seed)."""
    data_spec = data if isinstance(data, DataSpec) else DataSpec(data, data_dir)
    attack_spec = attack if isinstance(attack, AttackSpec) else AttackSpec(attack, **attack_settings)
    return prepare(data_spec, attack_spec, seed, device=device)


def audit(purified: nn.Module, backdoored: nn.Module, *, data: str | DataSpec = "fashion-mnist",
          attack: str | AttackSpec = "badnets", clean: nn.Module | None = None,
          checks: Sequence[str] = ("ra", "qra", "lmc"), seed: int = 0, profile: str | None = None,
          params: Mapping[str, dict] | None = None, data_dir: str | None = None, device: str = "auto",
          **attack_settings) -> dict:
    """Audit `purified` (a defense's output of `backdoored`) for superficial safety; the models are not changed.

    Args:
        purified, backdoored, clean: any `nn.Module`s taking [0, 1] images; `clean` (a model trained without
            the backdoor) is the reference QRA needs.
        data: a dataset name (see `bdsafety.data.DATASET_NAMES`) or a DataSpec; `data_dir` where it lies.
        attack: the attack name or an AttackSpec; `attack_settings` (`poison_rate`, `target`, `labels`,
            `params`) complete a name as in `bdsafety train`.
        checks: audits by name (`bdsafety.audits.AUDITS.names()`), with their dependencies added.
        profile: audit lengths, "cpu" or "paper" (default: the dataset's).
        params: per-audit parameters, e.g. {"ra": {"epochs": 5}}.

    Returns:
        {"purified": {"clean_acc", "asr"}, "backdoored": {...}, <check>: its metrics, ..., "clean_reference":
        the checks run on `clean` too (RA, the budget curve), "card": the verdict card} as in audit.json.
    """
    chosen = resolve_device(device)
    setup = setup_for(data, attack, seed, data_dir, chosen, **attack_settings)
    profile = profile or default_profile(setup.bundle.name)
    methods = create_audits(single_shot(list(checks)), profile, params=params)
    given = {"purified": purified, "backdoored": backdoored, "clean": clean}
    subjects = {role: Stage(role, checked(model.to(chosen).eval(), role, setup), Record("import", role, {}, {}, seed))
                for role, model in given.items() if model is not None}
    result = {"purified": evaluate_setup(subjects["purified"].model, setup),
              "backdoored": evaluate_setup(subjects["backdoored"].model, setup),
              **stages.audit_models(methods, subjects, setup, seed)}
    reference = stages.reference_audits(methods, subjects, setup, seed)
    card = verdict_card(result["purified"], {name: result[name] for name in methods}, reference)
    return {**result, "clean_reference": reference, "card": card}


def checked(model: nn.Module, role: str, setup: Setup) -> nn.Module:
    """`model`, after one test image shows that it takes the dataset's images and gives one logit per class."""
    probe = setup.bundle.test.images[:1].float().div(255).to(next(model.parameters()).device)
    shape = "x".join(str(n) for n in probe.shape[1:])
    try:
        with torch.no_grad():
            logits = model(probe)
    except Exception as exc:  # the user's forward: any failure means it does not take these images
        raise UsageError(f"the {role} model fails on a {shape} image of {setup.bundle.name} in [0, 1] "
                         f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}); build it for this "
                         "dataset") from None
    if not isinstance(logits, torch.Tensor) or logits.shape != (1, setup.bundle.num_classes):
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UsageError(f"the {role} model gives {found} for one image; {setup.bundle.name} needs "
                         f"(1, {setup.bundle.num_classes}) logits")
    return model
