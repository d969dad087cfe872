"""Every spec type of the pipeline and the plan built from them.

A YAML spec (+ dotted --set overrides) becomes one frozen, validated `ExperimentSpec`, and then a `Plan`:
the spec with its attacks, defenses and audits built for its profile. Validation happens here, once, at
the edge and before any work: an unknown key, name or method parameter, a wrong type or an impossible
value is a UsageError naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..attacks import ATTACKS, LABEL_POLICIES, Attack
from ..attacks._common import check_clean_label_rate
from ..audits import AUDITS, Audit, create_audits, missing_dependencies
from ..data import DATASET_NAMES, DataBundle, run_split, seed_for
from ..defenses import DEFENSES, Defense
from ..errors import UsageError
from ..models import MODELS
from ..models.factory import FACTORIES
from ..profiles import MODEL_FOR_PROFILE, TRAIN_PROFILES, default_profile
from ..registry import parameter_names
from ..store import canonical_hash
from ..train import TrainConfig, training_augmentation

CHECKS = ("ra", "qra", "lmc", "trajectory")
# The practitioner's audits beyond the paper's (bdsafety demo --practitioner adds them to a demo)
PRACTITIONER_CHECKS = ("ra_curve", "position", "bec", "uap", "uap_transfer")
DEFENDER_DATA = ("official", "held_out")  # DataSpec.defender_data
PAPER_DEFENSES = ("ep", "ft", "fst", "ft_sam", "anp", "i_bau", "bti_dbf", "pam")


@dataclass(frozen=True)
class DataSpec:
    name: str = "fashion-mnist"
    data_dir: str | None = None
    reserve_fraction: float = 0.05  # the defender's clean split, held out of training (`defender_data: held_out`)
    # held-out training images on which defense settings are calibrated, never the test set, never trained on
    calibration_fraction: float = 0.0
    # "official": each defense draws its own share from the clean training images the backdoored model saw, as the
    # paper's code does; "held_out": one reserve of `reserve_fraction`, kept out of backdoor training
    defender_data: str = "official"


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an experiment; "none" trains the clean model."""

    name: str = "badnets"
    poison_rate: float = 0.05
    target: int = 0
    params: dict = field(default_factory=dict)
    labels: str = "all2one"  # or "all2all": class y -> (y + 1) mod C (the target is then unused)

    @property
    def label(self) -> str:
        policy = "all2all" if self.labels == "all2all" else f"t{self.target}"
        return f"{self.name}-{self.poison_rate:g}-{policy}"

    @property
    def target_label(self) -> int | str:
        """What results show as the target: the class, or "all2all"."""
        return "all2all" if self.labels == "all2all" else self.target

    def key_inputs(self) -> dict:
        """The fields a stage key hashes (`labels` only where it is not the default, so all-to-one keys stay put)."""
        inputs = dataclasses.asdict(self)
        if self.labels == "all2one":
            del inputs["labels"]
        return inputs

    def build(self, seed: int, profile: str = "paper", context: dict | None = None) -> Attack:
        """The (unfitted) attack: the profile's lengths, then the spec's parameters; its seed derives from `seed`.

        `context` (the dataset's normalisation and class count, when loaded) and the spec's poison rate fill
        the fields of those names that an attack has and the spec leaves unset (Input-aware trains its victim
        with them)."""
        params = dict(self.params)
        known = parameter_names(ATTACKS.get(self.name))
        filled = {"seed": seed_for(seed, "trigger"), "poison_rate": self.poison_rate, **(context or {})}
        params.update({name: value for name, value in filled.items() if name in known and name not in params})
        return ATTACKS.create(self.name, profile, **params)


CLEAN = AttackSpec("none")


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment: a dataset, a model, one or more attacks, the defenses and the audit checks."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    model: str | None = None  # None: the profile's model
    profile: str | None = None  # None: "cpu" for small datasets, else "paper"
    seed: int = 0
    seeds: tuple[int, ...] = ()  # several seeds: one block per (attack, seed); empty: just `seed`
    reserve_fraction: float = 0.05
    calibration_fraction: float = 0.0  # held-out training images for choosing settings (never the test set)
    defender_data: str = "official"  # or "held_out" (DataSpec)
    attacks: tuple[AttackSpec, ...] = (AttackSpec(),)
    train: dict = field(default_factory=dict)  # TrainConfig overrides, e.g. {epochs: 4}
    defenses: tuple[str, ...] = PAPER_DEFENSES
    defense_params: dict = field(default_factory=dict)  # {defense: {param: value}}
    checks: tuple[str, ...] = CHECKS
    audit_params: dict = field(default_factory=dict)  # {ra|qra|lmc|trajectory: {param: value}}
    # audit a cell whose backdoored model does not follow its poisons (ASR < 50 %) all the same; its cards say so
    audit_unimplanted: bool = False
    note: str = ""  # shown on the report's results table and the console table (why a cut spec's verdicts differ)

    @property
    def resolved_profile(self) -> str:
        return self.profile or default_profile(self.dataset)

    @property
    def resolved_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)

    @property
    def data(self) -> DataSpec:
        return DataSpec(self.dataset, self.data_dir, self.reserve_fraction, self.calibration_fraction,
                        self.defender_data)

    def to_json(self) -> dict:
        """The spec as plain data (spec.yaml); `seeds` only when given (single-seed specs keep their hash)."""
        data = dataclasses.asdict(self)
        for name in ("seeds", "audit_unimplanted", "note"):  # absent when unset: specs keep their earlier hash
            if not data[name]:
                del data[name]
        return data

    def digest(self) -> str:
        """The spec's hash; a held_out spec hashes without the field, as specs did before it existed (it is
        written to spec.yaml all the same, so that reading the file back gives the same protocol)."""
        data = self.to_json()
        if data["defender_data"] == "held_out":
            del data["defender_data"]
        return canonical_hash(data)


@dataclass(frozen=True)
class Plan:
    """A validated spec with its methods built for its profile: what a run needs, checked before any work."""

    spec: ExperimentSpec
    profile: str
    model: str
    train_config: TrainConfig
    defenses: dict[str, Defense]
    audits: dict[str, Audit]  # in run order: an audit after those whose model or settings it takes


def build_plan(spec: ExperimentSpec) -> Plan:
    """Build every method of `spec` for its profile; any unknown or invalid parameter fails here."""
    profile = spec.resolved_profile
    try:
        config = TrainConfig(**{**TRAIN_PROFILES[profile].to_json(), **spec.train})
    except TypeError as exc:
        raise UsageError(f"spec 'train': {exc}") from None
    augmentation = training_augmentation(config)  # every defense and RA fine-tune like the backdoored model
    model = spec.model or MODEL_FOR_PROFILE[profile]
    for attack in spec.attacks:
        for seed in spec.resolved_seeds:
            built = attack.build(seed, profile)
            if hasattr(built, "check_model"):  # an attack that trains its victim itself trains this model
                built.check_model(model)
    shared = {**augmentation, "dataset": spec.dataset}  # a defense whose official value depends on it (FST)
    defenses = {name: DEFENSES.create(name, profile, shared, **spec.defense_params.get(name, {}))
                for name in spec.defenses}
    audits = create_audits(spec.checks, profile, augmentation, spec.audit_params)
    return Plan(spec, profile, model, config, defenses, audits)


def load_plan(path: str | Path | None, overrides: list[str] | None = None) -> Plan:
    return build_plan(load_spec(path, overrides))


def load_plans(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Plan]:
    """Every plan of a spec whose `dataset` or `model` may be a list (one run per dataset × model, named
    `<dataset>-<model>`), each built and checked before any of them runs."""
    plans = [build_plan(parse_spec(raw)) for raw in grid_specs(read_raw(path, overrides))]
    return {f"{plan.spec.dataset}-{plan.model}": plan for plan in plans}


def grid_specs(raw: dict) -> list[dict]:
    """The raw specs of a grid: `dataset: [a, b]` and `model: [m, n]` expand into one spec per pair."""
    def values(key: str) -> list:
        value = raw.get(key)
        if isinstance(value, list):
            expect(bool(value) and len(set(map(str, value))) == len(value),
                   f"spec '{key}' list must be non-empty and without repeats, got {value!r}")
            return value
        return [value] if key in raw else [None]

    return [{**raw, **({"dataset": d} if d is not None else {}), **({"model": m} if m is not None else {})}
            for d in values("dataset") for m in values("model")]


def read_raw(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    raw = read_yaml(Path(path)) if path else {}
    for item in overrides or []:
        apply_override(raw, item)
    return raw


def load_spec(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read a YAML spec (or start from the defaults), apply `key.sub=value` overrides, validate."""
    return parse_spec(read_raw(path, overrides))


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"spec file {path} not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a YAML mapping of spec fields, got {type(data).__name__}")
    return data


def parse_assignment(item: str) -> tuple[str, object]:
    """`key=value` with the value parsed as YAML (numbers, booleans, strings, lists)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"--set expects key=value, got '{item}'")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise UsageError(f"--set {key}: cannot parse value '{value}'") from None


def apply_override(raw: dict, item: str) -> None:
    key, parsed = parse_assignment(item)
    node, parts = raw, key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"--set {key}: '{part}' is not a mapping")
    node[parts[-1]] = parsed


def parse_spec(raw: dict) -> ExperimentSpec:
    known = {f.name for f in dataclasses.fields(ExperimentSpec)}
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
        raise UsageError(f"unknown spec key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
    values = {k: v for k, v in raw.items() if v is not None or k in ("data_dir", "model", "profile")}
    values = {**values, **parse_lists(values), **parse_seeds(values)}
    spec = ExperimentSpec(**values)
    validate(spec)
    return spec


def parse_seeds(raw: dict) -> dict:
    """`seeds: [0, 1]` (a list of distinct non-negative integers); `seed`, when also given, must be one of them.

    Without an explicit `seed`, it becomes the first of `seeds` (the seed of the first results block).
    """
    if "seeds" not in raw:
        return {}
    seeds = raw["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    expect(isinstance(seeds, list) and seeds and all(is_seed(s) for s in seeds) and len(set(seeds)) == len(seeds),
           f"spec 'seeds' must be a non-empty list of distinct non-negative integers, got {seeds!r}")
    if "seed" in raw:
        expect(raw["seed"] in seeds, f"spec 'seed' ({raw['seed']!r}) is not one of 'seeds' {seeds}; drop one of them")
    return {"seeds": tuple(seeds), "seed": raw.get("seed", seeds[0])}


def is_seed(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_lists(raw: dict) -> dict:
    out = {}
    if "attacks" in raw:
        entries = raw["attacks"]
        if isinstance(entries, (str, dict)):
            entries = [entries]
        if not isinstance(entries, list) or not entries:
            raise UsageError("spec 'attacks' must be a non-empty list of attack names or mappings")
        out["attacks"] = tuple(a for e in entries for a in parse_attack(e))
    for key in ("defenses", "checks"):
        if key in raw:
            items = raw[key]
            if isinstance(items, str):
                items = [s.strip() for s in items.split(",") if s.strip()]
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise UsageError(f"spec '{key}' must be a list of names")
            out[key] = tuple(items)
    return out


def parse_attack(entry) -> list[AttackSpec]:
    """One attack entry; `poison_rate: [0.05, 0.1]` expands into one entry per rate."""
    if isinstance(entry, str):
        return [AttackSpec(name=entry)]
    if not isinstance(entry, dict):
        raise UsageError(f"each attack must be a name or a mapping, got {entry!r}")
    known = {f.name for f in dataclasses.fields(AttackSpec)}
    unknown = sorted(str(k) for k in set(entry) - known)
    if unknown:
        raise UsageError(f"unknown attack key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
    rates = entry.get("poison_rate", AttackSpec.poison_rate)
    if not isinstance(rates, list):
        return [AttackSpec(**entry)]
    expect(bool(rates), f"attack '{entry.get('name')}': poison_rate list must not be empty")
    return [AttackSpec(**{**entry, "poison_rate": rate}) for rate in rates]


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_name_in(value, names) -> bool:
    return isinstance(value, str) and value in names


def validate(spec: ExperimentSpec) -> None:
    expect(is_name_in(spec.dataset, DATASET_NAMES),
           f"spec 'dataset' must be one of {', '.join(DATASET_NAMES)}, got {spec.dataset!r}")
    expect(spec.model is None or is_name_in(spec.model, MODELS) or is_name_in(spec.model, FACTORIES),
           f"spec 'model' must be one of {', '.join(MODELS.names())}, got {spec.model!r}")
    expect(spec.profile is None or is_name_in(spec.profile, TRAIN_PROFILES),
           f"spec 'profile' must be one of {', '.join(sorted(TRAIN_PROFILES))}, got {spec.profile!r}")
    expect(is_seed(spec.seed), f"spec 'seed' must be a non-negative integer, got {spec.seed!r}")
    expect(isinstance(spec.seeds, tuple) and all(is_seed(s) for s in spec.seeds),
           f"spec 'seeds' must be a list of non-negative integers, got {spec.seeds!r}")
    expect(is_number(spec.reserve_fraction) and 0 < spec.reserve_fraction < 1,
           f"spec 'reserve_fraction' must be in (0, 1), got {spec.reserve_fraction!r}")
    expect(spec.defender_data in DEFENDER_DATA, f"spec 'defender_data' must be one of {', '.join(DEFENDER_DATA)}, got "
                                                f"{spec.defender_data!r}")
    expect(is_number(spec.calibration_fraction) and 0 <= spec.calibration_fraction < 1 - spec.reserve_fraction,
           f"spec 'calibration_fraction' must be in [0, 1 - reserve_fraction), got {spec.calibration_fraction!r}")
    for entry in spec.attacks:
        validate_attack(entry)
    blocks = [(a.name, a.poison_rate, a.target, a.labels, json.dumps(a.params, sort_keys=True, default=str))
              for a in spec.attacks]
    expect(len(set(blocks)) == len(blocks), "spec 'attacks' lists the same attack twice (same name, rate, target, "
                                            "labels and params); use 'seeds' for repeats")
    expect(isinstance(spec.note, str), f"spec 'note' must be a string, got {spec.note!r}")
    expect(isinstance(spec.audit_unimplanted, bool),
           f"spec 'audit_unimplanted' must be true or false, got {spec.audit_unimplanted!r}")
    for name in spec.defenses:
        expect(name in DEFENSES, f"unknown defense {name!r} in spec; choose from: {', '.join(DEFENSES.names())}")
    for name in spec.checks:
        expect(name in AUDITS, f"unknown check {name!r} in spec; choose from: {', '.join(AUDITS.names())}")
    for name, dependency in missing_dependencies(spec.checks):
        expect(False, f"spec 'checks': {name} needs {dependency} in the checks too")
    for key in ("train", "defense_params", "audit_params"):
        expect(isinstance(getattr(spec, key), dict), f"spec '{key}' must be a mapping")
    for name in spec.defense_params:
        expect(name in DEFENSES, f"spec 'defense_params' names unknown defense {name!r}")
    for name in spec.audit_params:
        expect(name in AUDITS, f"spec 'audit_params' names unknown check {name!r}")


def validate_attack(entry: AttackSpec) -> None:
    expect(is_name_in(entry.name, ATTACKS),
           f"unknown attack {entry.name!r} in spec; choose from: {', '.join(ATTACKS.names())}")
    expect(is_number(entry.poison_rate) and 0 < entry.poison_rate < 1,
           f"attack '{entry.name}': poison_rate must be in (0, 1), got {entry.poison_rate!r}")
    expect(isinstance(entry.target, int) and not isinstance(entry.target, bool) and entry.target >= 0,
           f"attack '{entry.name}': target must be a non-negative integer, got {entry.target!r}")
    expect(isinstance(entry.params, dict), f"attack '{entry.name}': params must be a mapping")
    expect(is_name_in(entry.labels, LABEL_POLICIES),
           f"attack '{entry.name}': labels must be one of {', '.join(LABEL_POLICIES)}, got {entry.labels!r}")
    expect(entry.labels == "all2one" or not ATTACKS.get(entry.name).clean_label,
           f"attack '{entry.name}' is clean-label (its poisons keep their labels), so it is all-to-one only; "
           f"drop labels: {entry.labels}")


def check_against_data(spec: ExperimentSpec, bundle: DataBundle) -> None:
    """The checks that need the dataset: every target is a class, every clean-label rate fits the target class.

    Run before anything is written, so an impossible spec fails at once, not after the clean model trained.
    """
    for entry in spec.attacks:
        expect(entry.target < bundle.num_classes, f"attack '{entry.name}': target must be a class of {spec.dataset} "
                                                  f"(0..{bundle.num_classes - 1}), got {entry.target}")
    for seed in spec.resolved_seeds:
        train_labels = bundle.train.labels[run_split(len(bundle.train), seed, spec.defender_data, spec.reserve_fraction,
                                                     spec.calibration_fraction).train]
        for entry in spec.attacks:
            if ATTACKS.get(entry.name).clean_label:
                check_clean_label_rate(train_labels, entry.poison_rate, entry.target)
