"""The Python API: audit model objects you built yourself, of any architecture.

    import bdsafety
    poisons = bdsafety.PoisonFolders(train="poisons/train", test="poisons/test")
    report = bdsafety.audit(purified, backdoored, data="fashion-mnist", poisons=poisons, checks=("ra", "lmc"))

The models need only `forward`: they take float [0, 1] images of the dataset's shape (wrap a model that
expects normalised input with `with_normalization`) and give logits. The poisons are the attacker's own
(`poisons=`: folders of poisoned images, a trigger pattern and mask, or a BackdoorBench record), or, for
models backdoored by bdsafety's own attack, rebuilt from (data, attack, seed) exactly as `bdsafety train`
builds them (`attack=`). The backdoored model must follow them (ASR at least 50 %), or the audit is refused:
poisons that are not its backdoor say nothing about the purified model.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .audits import single_shot
from .errors import UsageError
from .pipeline.audit_inputs import AuditInputs, implanted_check, profile_augmentation, run_audit
from .pipeline.setup import Setup, prepare, prepare_external
from .pipeline.specs import AttackSpec, DataSpec
from .profiles import default_profile
from .poisons import TriggerSource
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


def audit(purified: nn.Module, backdoored: nn.Module | None = None, *, data: str | DataSpec = "fashion-mnist",
          poisons: TriggerSource | None = None, attack: str | AttackSpec | None = None, clean: nn.Module | None = None,
          checks: Sequence[str] = ("ra", "qra", "lmc"), seed: int = 0, profile: str | None = None,
          params: Mapping[str, dict] | None = None, data_dir: str | None = None, device: str = "auto",
          audit_anyway: bool = False, **attack_settings) -> dict:
    """Audit `purified` (a defense's output of `backdoored`) for superficial safety; the models are not changed.

    Args:
        purified, backdoored, clean: any `nn.Module`s taking [0, 1] images; `clean` (a model trained without
            the backdoor) is the reference QRA needs; `backdoored` is needed by LMC, position and BEC, and by
            the check that the poisons are its backdoor (its ASR under them must reach 50 %, else the audit is
            refused unless `audit_anyway`).
        data: a dataset name (see `bdsafety.data.DATASET_NAMES`) or a DataSpec; `data_dir` where it lies.
        poisons: the attacker's own poisons: `bdsafety.PoisonFolders(train=DIR, test=DIR)`,
            `bdsafety.TriggerFile(pattern=PNG, mask=PNG, target=T, alpha=A)` or
            `bdsafety.BackdoorBenchPoisons(RECORD_DIR)`.
        attack: instead of `poisons`, for models backdoored by bdsafety's own attack of that name: its trigger and
            poisons are rebuilt from (data, attack, seed) as `bdsafety train` builds them; `attack_settings`
            (`poison_rate`, `target`, `labels`, `params`) complete the name.
        checks: audits by name (`bdsafety.audits.AUDITS.names()`), with their dependencies added.
        profile: audit lengths, "cpu" or "paper" (default: the dataset's).
        params: per-audit parameters, e.g. {"ra": {"epochs": 5}}.

    Returns:
        {"trigger_source", "warnings", "purified": {"clean_acc", "asr"}, "backdoored": {...}, <check>: its
        metrics, ..., "clean_reference": the checks run on `clean` too (RA, the budget curve), "card": the
        verdict card} as in audit.json.
    """
    if (poisons is None) == (attack is None):
        raise UsageError("pass the attacker's poisons (poisons=bdsafety.PoisonFolders(...), TriggerFile(...) or "
                         "BackdoorBenchPoisons(...)) or, for a bdsafety attack, attack=NAME; not both, not neither")
    chosen = resolve_device(device)
    if poisons is not None:
        data_spec = data if isinstance(data, DataSpec) else DataSpec(data, data_dir)
        setup = prepare_external(data_spec, poisons, seed)
    else:
        setup = setup_for(data, attack, seed, data_dir, chosen, **attack_settings)
    profile = profile or default_profile(setup.bundle.name)
    given = {"purified": purified, "backdoored": backdoored, "clean": clean}
    subjects = {role: Stage(role, checked(model.to(chosen).eval(), role, setup), Record("import", role, {}, {}, seed))
                for role, model in given.items() if model is not None}
    inputs = AuditInputs(setup, subjects, profile, profile_augmentation(profile), seed,
                         implanted_check(subjects, setup, audit_anyway))
    return run_audit(inputs, single_shot(list(checks)), params)


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
