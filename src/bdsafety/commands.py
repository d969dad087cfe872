"""What each `bdsafety` command does: parse its arguments into the pipeline's terms, call the stages, print.

`run` and `demo` run a whole spec; `train`, `purify` and `audit` run one stage each, with the same stage
functions (`pipeline.stages`), and write one directory.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib import resources
from pathlib import Path

from . import store
from .audits import create_audits, single_shot, single_shot_checks
from .results.card import card_text
from .defenses import DEFENSES, summary
from .errors import UsageError
from .models.factory import check_model_name
from .pipeline import stages
from .pipeline.setup import evaluate_setup, prepare
from .pipeline.specs import (CHECKS, PRACTITIONER_CHECKS, AttackSpec, DataSpec, ExperimentSpec, build_plan, load_plans,
                             parse_assignment, read_raw, validate)
from .train import resolve_device

log = logging.getLogger("bdsafety")


def parse_assignments(items: list[str] | None) -> dict:
    """`key=value` pairs; values are parsed as YAML scalars (numbers, booleans, strings)."""
    return dict(parse_assignment(item) for item in items or [])


def free_out(out: str) -> Path:
    """`--out` as a path that does not exist yet (or is an empty directory)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} already exists; choose another --out or remove it")
    return path


def attack_of(args) -> AttackSpec:
    return AttackSpec(args.attack, args.poison_rate, args.target, parse_assignments(args.set), args.labels)


def cmd_train(args) -> int:
    out, attack = free_out(args.out), attack_of(args)
    if args.model:
        check_model_name(args.model)
    overrides = {key: value for key, value in (("epochs", args.epochs), ("precision", args.precision))
                 if value is not None}
    spec = ExperimentSpec(dataset=args.dataset, data_dir=args.data_dir, model=args.model, profile=args.profile,
                          seed=args.seed, reserve_fraction=args.reserve_fraction, defender_data=args.defender_data,
                          attacks=(attack,) if attack.name != "none" else (), train=overrides, defenses=(), checks=())
    validate(spec)
    plan, device = build_plan(spec), resolve_device(args.device)
    setup = prepare(spec.data, attack, args.seed, profile=plan.profile, device=device)
    log.info("training %s on %s (%s, %d epochs, %s)", plan.model, args.dataset, args.attack, plan.train_config.epochs,
             device)
    model, record, tensors = stages.train(setup, spec.data, plan.model, plan.train_config, plan.profile, args.seed,
                                          device)
    store.save_stage(out, model, setup.model_spec(plan.model), record, tensors)
    return saved(out, record.metrics)


def saved(out: Path, metrics: dict) -> int:
    print(format_metrics(metrics))
    print(f"saved {out}")
    return 0


def cmd_eval(args) -> int:
    model, _, record = store.load_stage(Path(args.dir), resolve_device(args.device))
    print(format_metrics(evaluate_setup(model, stages.setup_of(record, args.data_dir))))
    return 0


def cmd_purify(args) -> int:
    out, device = free_out(args.out), resolve_device(args.device)
    backdoored, spec = stages.load_model_stage(args.source, device)
    record, profile = backdoored.record, stages.profile_of(args.profile, backdoored.record)
    shared = {**(stages.augmentation_of(record) or {}), "dataset": record.details["data"]["name"]}
    defense = DEFENSES.create(args.defense, profile, shared, **parse_assignments(args.set))
    setup = stages.setup_of(record, args.data_dir)
    model, purified, tensors = stages.purify(args.defense, defense, backdoored, setup, record.seed, profile)
    store.save_stage(out, model, spec, purified, tensors)
    return saved(out, purified.metrics)


def audit_names(text: str) -> list[str]:
    """The checks asked for ('all': every single-model audit), in run order with the audits they take a model
    from (QRA: RA)."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    return single_shot(single_shot_checks() if names == ["all"] else names)


def audit_params(items: list[str] | None) -> dict[str, dict]:
    """`audit.key=value` pairs (e.g. `lmc.points=21`) as {audit: {key: value}}."""
    params: dict[str, dict] = {}
    for item in items or []:
        key, value = parse_assignment(item)
        audit, dot, name = key.partition(".")
        if not dot or not name:
            raise UsageError(f"--set expects audit.key=value (e.g. lmc.points=21), got '{item}'")
        params.setdefault(audit, {})[name] = value
    return params


def trigger_source_of(args):
    """The poisons the command line names (None: the attack a run directory's record names)."""
    from .poisons import PoisonFolders, TriggerFile

    given = {"--backdoorbench": args.backdoorbench, "--poisons-train/--poisons-test": args.poisons_train or
             args.poisons_test, "--trigger": args.trigger or args.trigger_mask}
    chosen = [flag for flag, value in given.items() if value]
    if len(chosen) > 1:
        raise UsageError(f"give one source of poisons, got {' and '.join(chosen)}")
    loose = [flag for flag, value in (("--target", args.target), ("--trigger-alpha", args.trigger_alpha))
             if value is not None and not args.trigger]
    if loose:
        raise UsageError(f"{loose[0]} goes with --trigger PNG --trigger-mask PNG")
    if args.labels and not (args.trigger or args.poisons_train or args.poisons_test):
        raise UsageError("--labels goes with --trigger or --poisons-train/--poisons-test")
    if args.backdoorbench:
        from .poisons.record import RecordSource

        return RecordSource(args.backdoorbench)
    if args.poisons_train or args.poisons_test:
        if not (args.poisons_train and args.poisons_test):
            raise UsageError("poison folders come in pairs: pass --poisons-train DIR and --poisons-test DIR")
        return PoisonFolders(args.poisons_train, args.poisons_test, args.labels or "all2one")
    if args.trigger or args.trigger_mask:
        if not (args.trigger and args.trigger_mask) or args.target is None and args.labels != "all2all":
            raise UsageError("a trigger file needs --trigger PNG --trigger-mask PNG and --target T (or --labels "
                             "all2all)")
        return TriggerFile(args.trigger, args.trigger_mask, args.target or 0,
                           1.0 if args.trigger_alpha is None else args.trigger_alpha, args.labels or "all2one")
    return None


def cmd_audit(args) -> int:
    from .pipeline.audit_inputs import resolve, run_audit

    out, device, names = free_out(args.out), resolve_device(args.device), audit_names(args.checks)
    params = audit_params(args.set)
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise UsageError(f"--set {unknown[0]}.*: '{unknown[0]}' is not among the checks ({', '.join(names)})")
    source = trigger_source_of(args)
    if args.model:
        check_model_name(args.model)
    paths = {"purified": args.purified, "backdoored": args.backdoored,
             "clean": None if args.clean == "train" else args.clean}
    if args.backdoorbench:
        return audit_record(args, source, paths, names, params, out, device)
    if not args.purified:
        raise UsageError("pass --purified PATH, the model to audit")
    inputs = resolve(paths, model_name=args.model, dataset=args.dataset, data_dir=args.data_dir, source=source,
                     seed=args.seed, profile=args.profile, device=device, train_clean=args.clean == "train",
                     audit_anyway=args.audit_anyway)
    audited = run_audit(inputs, names, params, skip_unsupported=args.checks.strip() == "all")
    write_audit(out, {"checks": names, "paths": {k: v for k, v in paths.items() if v}, **audited})
    print_audit(audited, names, Path(args.purified).name)
    print(f"saved {out / store.AUDIT_FILE}")
    return 0


def audit_record(args, source, paths: dict, names: list[str], params: dict, out: Path, device) -> int:
    """`bdsafety audit --backdoorbench RECORD_DIR`: the given purified model, or every defense_result.pt of the
    record, audited against the record's own poisons; one directory with audit.json per purified model."""
    from .pipeline.audit_inputs import record_audits, run_audit
    from .report.record_audit import record_report

    audits = record_audits(source, paths, model_name=args.model, dataset=args.dataset, data_dir=args.data_dir,
                           seed=args.seed, profile=args.profile, device=device, train_clean=args.clean == "train",
                           audit_anyway=args.audit_anyway)
    results = {}
    for name, inputs in audits:
        results[name] = run_audit(inputs, names, params, skip_unsupported=args.checks.strip() == "all")
        print_audit(results[name], names, name)
    with store.publishing(out) as tmp:
        for name, audited in results.items():
            store.write_json(tmp / name / store.AUDIT_FILE, {"checks": names, "defense": name, **audited,
                                                            "versions": store.versions()})
        (tmp / "report.md").write_text(record_report(Path(args.backdoorbench).name, results))
    print(f"saved {len(results)} audits in {out}/<defense>/{store.AUDIT_FILE} and their report in {out}/report.md")
    return 0


def write_audit(out: Path, content: dict) -> None:
    store.publish_json(out, store.AUDIT_FILE, content)


def print_audit(audited: dict, names: list[str], title: str) -> None:
    ran = [name for name in names if name in audited]
    print(format_metrics({"purified_asr": audited["purified"]["asr"],
                          **{f"{name}_{key}": audited[name][key] for name in ran for key in ("asr", "asr_purified")
                             if isinstance(audited[name].get(key), (int, float))}}))
    for name, why in audited.get("skipped", {}).items():
        print(f"skipped {name}: {why}")
    print(card_text(audited["card"], title))


def cmd_run(args) -> int:
    return run_grid(load_plans(args.spec, args.set), args)


DEMO_SPECS = {"quick": "quick.yaml", "full": "full.yaml", "attacks": "attacks.yaml", "default": "demo.yaml"}


def cmd_demo(args) -> int:
    chosen = [variant for variant in ("quick", "full", "attacks") if getattr(args, variant, False)]
    if len(chosen) > 1:
        raise UsageError(f"choose one of --quick, --full and --attacks, got --{' and --'.join(chosen)}")
    spec = resources.files("bdsafety") / "configs" / DEMO_SPECS[chosen[0] if chosen else "default"]
    return run_grid(load_plans(spec, demo_overrides(spec, args)), args)


def demo_overrides(spec, args) -> list[str]:
    """The demo's --set overrides, then --practitioner's: the practitioner's audits after the spec's own checks."""
    overrides = list(args.set or [])
    if args.practitioner:
        checks = read_raw(spec, overrides).get("checks") or list(CHECKS)
        checks += [name for name in PRACTITIONER_CHECKS if name not in checks]
        overrides.append(f"checks=[{', '.join(checks)}]")
    return overrides


def run_grid(plans: dict, args) -> int:
    """One run per plan: in --out itself for a single plan, else in --out/<dataset>-<model>/."""
    out = Path(args.out)
    places = {name: out if len(plans) == 1 else out / name for name in plans}
    if args.dry_run:
        return print_dry_run(plans, places)
    for name, plan in plans.items():
        run_and_report(plan, places[name], args)
    return 0


def print_dry_run(plans: dict, places: dict) -> int:
    from .pipeline.run import dry_run

    for name, plan in plans.items():
        counts = dry_run(plan, places[name])
        print("\n".join(f"{name}: {cell}" if len(plans) > 1 else cell for cell in counts["cells"]))
        print(f"{len(counts['cells'])} cells, {counts['stages']} stages: {counts['compute']} to compute, "
              f"{counts['reuse']} stored in {places[name]}")
    return 0


def run_and_report(plan, out: Path, args) -> None:
    from .pipeline.run import run_experiment
    from .report import write_report  # matplotlib: only when a report is written
    from .report.tables import console_table

    results = run_experiment(plan, out, resolve_device(args.device), executor_of(args))
    paths = write_report(out)
    print(console_table(results))
    print(f"results: {out / store.RESULTS_FILE}; report: "
          f"{', '.join(str(p) for p in paths if p.suffix in ('.md', '.html'))}")


def executor_of(args):
    from .pipeline.executors import EXECUTORS

    if args.address and args.executor != "ray":
        raise UsageError("--address is the address of a Ray cluster; add --executor ray")
    return EXECUTORS.create(args.executor, **({"address": args.address} if args.address else {}))


def cmd_results(args) -> int:
    from .results.table import results_rows, to_csv, to_jsonl

    rows = results_rows([Path(d) for d in args.dirs], parse_assignments(args.where))
    sys.stdout.write((to_jsonl if args.format == "jsonl" else to_csv)(rows))
    return 0


def cmd_report(args) -> int:
    if args.docs:
        return report_docs(args)
    if args.title:
        raise UsageError("--title is the title of a --docs page; add --docs docs/results/NAME.md")
    from .report import write_report

    for directory in args.dirs:
        for path in write_report(Path(directory)):
            print(path)
    return 0


def report_docs(args) -> int:
    """`bdsafety report DIR... --docs PAGE.md`: the results page of the documentation site."""
    from .report.docs_page import write_docs_page

    written = write_docs_page([Path(d) for d in args.dirs], Path(args.docs), title=args.title)
    print(f"wrote {written.page} and {len(written.figures)} figures in {written.page.with_suffix('')}")
    if written.registered:
        print(f"listed it in {' and '.join(os.path.relpath(path) for path in written.registered)}")
    for todo in written.todo:
        print(f"to do by hand: {todo}")
    if written.unrecorded:
        print(f"not recorded by the runs, so the page says so: {', '.join(written.unrecorded)}")
    return 0


def cmd_import(args) -> int:
    from . import interop

    if args.attack is None:
        raise UsageError("name the bdsafety attack that made the model (--attack NAME), or --attack none for a clean "
                         "model; a model backdoored elsewhere is audited with its own poisons ('bdsafety audit "
                         "--backdoorbench', '--poisons-train/--poisons-test' or '--trigger')")
    out, device, attack = free_out(args.out), resolve_device(args.device), attack_of(args)
    if args.model is not None:
        check_model_name(args.model)
    source = Path(args.file)
    state, model_name, origin = interop.read_any(source, args.format, args.model)
    check_origin(source, origin, args.dataset)
    data = DataSpec(args.dataset, args.data_dir, args.reserve_fraction, defender_data=args.defender_data)
    setup = prepare(data, attack, args.seed, device=device)
    if origin.get("backdoorbench_num_classes") not in (None, setup.bundle.num_classes):
        raise UsageError(f"{source} is a {origin['backdoorbench_num_classes']}-class model and {args.dataset} has "
                         f"{setup.bundle.num_classes} classes; import it with the dataset it was trained on")
    if args.format == "backdoorbench" and setup.attack is not None:
        check_same_trigger(source, setup)
    model, record, tensors = stages.imported(state, source, args.format, model_name, setup, data, args.seed, device,
                                             origin)
    store.save_stage(out, model, setup.model_spec(model_name), record, tensors)
    return saved(out, record.metrics)


def cmd_export(args) -> int:
    import io

    import torch

    from . import interop

    destination = Path(args.out)
    if destination.exists():
        raise UsageError(f"{destination} exists; choose a new file name")
    model, spec, _ = store.load_stage(Path(args.dir))
    exported = interop.backdoorbench_export(model.state_dict(), spec.name, spec.num_classes)
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    destination.parent.mkdir(parents=True, exist_ok=True)
    store.atomic_write_bytes(destination, buffer.getvalue())
    print(f"saved {destination} (BackdoorBench defense_result.pt layout, model_name '{exported['model_name']}')")
    return 0


TRIGGER_AGREEMENT = 1.0  # mean absolute difference, in grey levels of 255, under which two triggers are one


def check_same_trigger(source: Path, setup) -> None:
    """A BackdoorBench attack result names no bdsafety attack: importing it as one (`--attack NAME`) is refused
    unless the poisoned test images it saved equal what bdsafety's attack makes of the same clean images;
    with the images absent, a warning says the trigger could not be checked."""
    from .attacks import map_uint8
    from .poisons.backdoorbench import read_record

    try:
        saved = read_record(source, *setup.bundle.shape[:2]).test
    except UsageError as exc:
        log.warning("the trigger of %s could not be compared with bdsafety's %s (%s); its ASR below is measured "
                    "with bdsafety's trigger", source, setup.attack_spec.name, exc)
        return
    clean = setup.bundle.test.images[saved.indices]
    ours = map_uint8(setup.attack.apply, clean)
    difference = (ours.float() - saved.images.images.float()).abs().mean().item()
    if difference > TRIGGER_AGREEMENT:
        raise UsageError(f"{source}'s saved poisoned test images differ from bdsafety's '{setup.attack_spec.name}' on "
                         f"the same images by {difference:.1f} grey levels on average: its trigger is not bdsafety's; "
                         f"audit it with its own poisons: bdsafety audit --backdoorbench {source.parent}")


def check_origin(source: Path, origin: dict, dataset: str) -> None:
    """A BackdoorBench file names the dataset it was trained on; importing it with another one is a mistake."""
    trained_on = origin.get("backdoorbench_dataset")
    if trained_on is not None and trained_on != dataset:
        raise UsageError(f"{source} was trained on '{trained_on}' but --dataset is '{dataset}'; pass "
                         f"--dataset {trained_on}")


def cmd_defenses(args) -> int:
    for name in DEFENSES.names():
        print(f"{name:12s} {summary(DEFENSES.get(name))}")
    return 0


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
