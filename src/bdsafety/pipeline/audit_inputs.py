"""What a single-shot audit audits: the models as given (run directories or weights files of any origin), the
dataset, and where the attacker's poisons come from.

A model is a bdsafety run directory, a `.safetensors` file, a weights-only `.pt` state dict or a BackdoorBench
result file; the architecture comes from `--model` (or `--model-factory`), else from whichever input names
it. The poisons come from the source given explicitly (a BackdoorBench record, poison folders, a trigger
file), else from the bdsafety attack a run directory's record names; with neither, the audit is refused:
auditing against a substituted trigger can call a backdoored model robust.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import interop, store
from ..errors import UsageError
from ..models import ModelSpec, create_model
from ..poisons import IMPLANTED_ASR, UNKNOWN_TRIGGER, TriggerSource
from ..profiles import TRAIN_PROFILES, default_profile
from ..store import Record, Stage
from ..train import training_augmentation
from . import stages
from .setup import Setup, evaluate_setup, prepare, prepare_external
from .specs import CLEAN, DataSpec, ExperimentSpec, build_plan

log = logging.getLogger(__name__)

ROLES = ("purified", "backdoored", "clean")


@dataclass(frozen=True)
class ModelInput:
    """One model as given: a run directory (`stage`, `spec`) or a file's weights in bdsafety's key names."""

    path: Path
    stage: Stage | None = None
    spec: ModelSpec | None = None
    state: dict | None = None
    model_name: str | None = None  # the architecture the input itself names
    dataset: str | None = None  # the dataset the input names
    num_classes: int | None = None
    origin: dict = field(default_factory=dict)

    @property
    def attack(self) -> str | None:
        """The bdsafety attack a run directory's record names (None: a file, a clean model, an outside source)."""
        details = self.stage.record.details if self.stage is not None else {}
        attack = details.get("attack") or {}
        name = attack.get("name")
        return None if name in (None, "none") or "source" in attack else name


def read_model_input(path: Path, model_name: str | None, device: torch.device) -> ModelInput:
    """A model argument of `bdsafety audit`, read without running anything from it."""
    if path.is_dir() and not (path / "attack_result.pt").is_file():
        stage, spec = stages.load_model_stage(path, device)
        data = stage.record.details.get("data") or {}
        return ModelInput(path, stage, spec, model_name=spec.name, dataset=data.get("name"),
                          num_classes=spec.num_classes)
    if path.is_dir():
        path = path / "attack_result.pt"
    if not path.is_file():
        raise UsageError(f"{path} not found; pass a run directory, a .safetensors file, a .pt state dict or a "
                         "BackdoorBench result file")
    if path.suffix != ".safetensors" and is_backdoorbench_result(path):
        state, name, origin = interop.read_any(path, "backdoorbench", model_name)
        return ModelInput(path, state=state, model_name=name, dataset=origin.get("backdoorbench_dataset"),
                          num_classes=origin.get("backdoorbench_num_classes"), origin=origin)
    return ModelInput(path, state=store.read_state_dict(path), model_name=model_name)


def is_backdoorbench_result(path: Path) -> bool:
    """Whether a torch file is a BackdoorBench result (a dict naming `model_name` beside its `model`)."""
    loaded = interop.load_restricted(path)
    return isinstance(loaded, dict) and "model_name" in loaded and isinstance(loaded.get("model"), dict)


def agreed(values: dict[str, object], what: str, fix: str) -> object | None:
    """The one value the inputs that name `what` agree on (None when none names it)."""
    named = {role: value for role, value in values.items() if value is not None}
    if len(set(named.values())) > 1:
        listed = ", ".join(f"{role} {value}" for role, value in named.items())
        raise UsageError(f"the models disagree on the {what} ({listed}); {fix}")
    return next(iter(named.values()), None)


@dataclass(frozen=True)
class AuditInputs:
    """Everything a single-shot audit runs on."""

    setup: Setup
    subjects: dict[str, Stage]
    profile: str
    augmentation: dict | None
    seed: int
    warnings: tuple[str, ...] = ()
    model: str | None = None  # the architecture's name, where it has one


def resolve(paths: dict[str, Path | None], *, model_name: str | None, dataset: str | None, data_dir: str | None,
            source: TriggerSource | None, seed: int, profile: str | None, device: torch.device,
            train_clean: bool = False, audit_anyway: bool = False) -> AuditInputs:
    """Read the models, choose the poisons and the dataset, build the setup and check the poisons are the
    backdoored model's own (the sanity gate: `audit_anyway` audits all the same, with a warning)."""
    inputs = {role: read_model_input(Path(path), model_name, device) for role, path in paths.items() if path}
    name = model_name or agreed({r: i.model_name for r, i in inputs.items()}, "architecture", "pass --model")
    if name is None:
        raise UsageError("no input names its architecture (weights files do not); pass --model NAME or "
                         "--model-factory")
    data_name = dataset or agreed({r: i.dataset for r, i in inputs.items()}, "dataset", "pass --dataset")
    if data_name is None:
        raise UsageError("no input names its dataset; pass --dataset NAME")
    setup, record = setup_of(inputs, data_name, data_dir, source, seed, device)
    seed = record.seed if record is not None else seed  # a bdsafety run's audits use its own seed
    chosen_profile = profile or (record.details.get("profile") if record else None) or default_profile(data_name)
    subjects = {role: subject(role, given, setup.model_spec(name), device) for role, given in inputs.items()}
    if train_clean:
        subjects["clean"] = trained_clean(setup, name, chosen_profile, seed, device)
    augmentation = stages.augmentation_of(record) if record is not None else profile_augmentation(chosen_profile)
    warnings = implanted_check(subjects, setup, audit_anyway)
    return AuditInputs(setup, subjects, chosen_profile, augmentation, seed, warnings, name)


def setup_of(inputs: dict[str, ModelInput], dataset: str, data_dir: str | None, source: TriggerSource | None,
             seed: int, device: torch.device) -> tuple[Setup, Record | None]:
    """The audit's setup: `source`'s poisons on `dataset`, else the bdsafety attack a run directory's record names
    (its exact setup), else a one-line refusal."""
    if source is not None:
        return prepare_external(DataSpec(dataset, data_dir), source, seed), None
    for role in ("backdoored", "purified", "clean"):
        given = inputs.get(role)
        if given is not None and given.attack is not None:
            record = given.stage.record
            if record.details["data"]["name"] != dataset:
                raise UsageError(f"{given.path} was trained on {record.details['data']['name']}, not {dataset}; "
                                 "drop --dataset")
            return stages.setup_of(record, data_dir, device), record
    external = next((i.stage.record for i in inputs.values() if i.stage is not None and i.attack is None
                     and "source" in (i.stage.record.details.get("attack") or {})), None)
    if external is not None:
        raise UsageError(f"the models were backdoored outside bdsafety, so their trigger is unknown here; {UNKNOWN_TRIGGER}")
    names = ", ".join(str(i.path) for i in inputs.values())
    raise UsageError(f"{names}: no record names a bdsafety attack, so the trigger is unknown; {UNKNOWN_TRIGGER}")


def subject(role: str, given: ModelInput, spec: ModelSpec, device: torch.device) -> Stage:
    """`given` as a model of architecture `spec` (a run directory of another architecture is refused)."""
    if given.stage is not None:
        if given.spec != spec:
            raise UsageError(f"{given.path} is a {given.spec.name} with {given.spec.num_classes} classes, the audit's "
                             f"models are {spec.name} with {spec.num_classes}; audit models of one architecture")
        return given.stage
    if given.num_classes not in (None, spec.num_classes):
        raise UsageError(f"{given.path} is a {given.num_classes}-class model and the dataset has {spec.num_classes} "
                         "classes; pass the dataset it was trained on")
    model = create_model(spec)
    store.load_weights_into(model, given.state, given.path)
    record = Record("import", role, {"source": str(given.path.resolve())}, {}, 0, details={"model": spec.name,
                                                                                            **given.origin})
    return Stage(str(given.path.resolve()), model.to(device).eval(), record, given.path)


def profile_augmentation(profile: str) -> dict:
    """The training augmentation of the profile's recipe: what RA's clean images get for a model made elsewhere."""
    return training_augmentation(TRAIN_PROFILES[profile])


def implanted_check(subjects: dict[str, Stage], setup: Setup, audit_anyway: bool) -> tuple[str, ...]:
    """The sanity gate: the backdoored model must follow the audit's poisons, or they are not its backdoor and an
    audit of the purified model against them says nothing (a low ASR after RA would be a false 'robust')."""
    if "backdoored" not in subjects:
        return ("no backdoored model was given, so the poisons were not checked against the backdoor: a low ASR "
                "means nothing if they are not its trigger",)
    asr = evaluate_setup(subjects["backdoored"].model, setup)["asr"]
    if asr >= IMPLANTED_ASR:
        return ()
    message = (f"the backdoored model's ASR under these poisons is {asr:.1%} (< {IMPLANTED_ASR:.0%}): they are not "
               "this model's backdoor")
    if not audit_anyway:
        raise UsageError(f"{message}; {UNKNOWN_TRIGGER} (or --audit-anyway to audit all the same)")
    return (message + "; audited anyway (--audit-anyway), so no verdict below can be trusted",)


def trained_clean(setup: Setup, model_name: str, profile: str, seed: int, device: torch.device) -> Stage:
    """A clean model of the audit's architecture, trained on the dataset with the profile's recipe, cached by
    content in the asset cache (like the fitted attacks): the reference QRA and the card need."""
    spec = ExperimentSpec(dataset=setup.bundle.name, model=model_name, profile=profile, seed=seed, attacks=(),
                          defenses=(), checks=())
    plan = build_plan(spec)
    data = DataSpec(setup.bundle.name, None)
    key = stages.stage_key("train", stages.train_inputs(data, CLEAN, seed, model_name, plan.train_config, profile))
    directory = store.asset_cache_dir() / "clean-models" / key
    if store.is_finished(directory):
        log.info("clean reference: cached %s", directory)
        return stages.load_model_stage(directory, device)[0]
    log.info("clean reference: training %s on %s (%d epochs)", model_name, setup.bundle.name, plan.train_config.epochs)
    clean_setup = prepare(data, CLEAN, seed, bundle=setup.bundle, profile=profile, device=device)
    model, record, tensors = stages.train(clean_setup, data, model_name, plan.train_config, profile, seed, device,
                                          progress=False)
    store.save_stage(directory, model, clean_setup.model_spec(model_name), record, tensors)
    return Stage(str(directory), model.eval(), record, directory)



def run_audit(inputs: AuditInputs, checks: list[str], params: dict | None = None,
              skip_unsupported: bool = False) -> dict:
    """The audits `checks` on the inputs' purified model (the clean model as the reference where it is given):
    {"trigger_source", "warnings", "purified", "backdoored", <check>: metrics, ..., "clean_reference", "card"}.
    A check that cannot run on this architecture is refused before any runs, or with `skip_unsupported` (`--checks
    all`) left out and listed under "skipped" with the reason."""
    from ..audits import create_audits
    from ..results.card import verdict_card

    methods = create_audits(checks, inputs.profile, inputs.augmentation, params)
    methods, skipped = supported(methods, inputs.subjects["purified"].model, skip_unsupported)
    subjects, setup = dict(inputs.subjects), inputs.setup
    measured = {role: evaluate_setup(subjects[role].model, setup) for role in ("purified", "backdoored")
                if role in subjects}
    result = {**measured, **stages.audit_models(methods, subjects, setup, inputs.seed)}
    reference = stages.reference_audits(methods, subjects, setup, inputs.seed)
    card = verdict_card(result["purified"], {name: result[name] for name in methods}, reference)
    card.update(trigger_source=setup.trigger_source, warnings=list(inputs.warnings))
    return {"dataset": setup.bundle.name, "model": inputs.model, "seed": inputs.seed,
            "trigger_source": setup.trigger_source, "warnings": list(inputs.warnings), **result,
            "clean_reference": reference, "card": card, **({"skipped": skipped} if skipped else {})}


def supported(methods: dict, model: torch.nn.Module, skip: bool) -> tuple[dict, dict[str, str]]:
    """`methods` without those that cannot run on `model` (and those that take a model or settings from them),
    and why each was left out; unless `skip`, the first that cannot run is refused in one line."""
    skipped = {name: why for name, method in methods.items() if (why := method.unsupported(model)) is not None}
    if skipped and not skip:
        name, why = next(iter(skipped.items()))
        raise UsageError(f"{name} cannot audit this model: {why}")
    for name, method in methods.items():
        dependencies = set(type(method).needs) | set(type(method).uses)
        if name not in skipped and (taken := dependencies & set(skipped)):
            skipped[name] = f"it takes {', '.join(sorted(taken))}, which cannot run"
    return {name: method for name, method in methods.items() if name not in skipped}, skipped


def record_audits(source, paths: dict[str, Path | None], **settings) -> list[tuple[str, AuditInputs]]:
    """(name, inputs) of every audit of a BackdoorBench record: the given purified model, else every
    `defense/<name>/defense_result.pt`; the backdoored model is the record's `attack_result.pt` unless given."""
    folder = source.folder_path
    interop.load_restricted(source.attack_result())  # a hostile file is refused before anything else is read
    purified = {Path(paths["purified"]).parent.name or "purified": paths["purified"]} if paths.get("purified") else \
        {path.parent.name: path for path in source.defense_results()}
    if not purified:
        raise UsageError(f"{folder} has no defense/<name>/defense_result.pt; pass --purified PATH")
    backdoored = paths.get("backdoored") or source.attack_result()
    return [(name, resolve({**paths, "purified": path, "backdoored": backdoored}, source=source, **settings))
            for name, path in purified.items()]
