"""The `bdsafety` command: parses, calls the pipeline's stages, prints. Bad input: one line on stderr, exit 2.

`bdsafety run` and `demo` run a whole spec; `train`, `purify` and `audit` run one stage each, with the
same stage functions (`pipeline.stages`), and write one directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import resources
from pathlib import Path

import torch

from . import __version__, store
from .audits import AUDITS, create_audits, with_dependencies
from .data import DATASET_NAMES
from .defenses import DEFENSES, summary
from .errors import UsageError
from .models import MODELS
from .pipeline import stages
from .pipeline.setup import evaluate_setup, prepare
from .pipeline.specs import AttackSpec, ExperimentSpec, build_plan, load_plan, parse_assignment, validate
from .registry import PROFILES
from .train import PRECISIONS, resolve_device

log = logging.getLogger("bdsafety")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as for every other bad input."""

    def error(self, message: str):
        raise UsageError(f"{message}; see '{self.prog} --help'")


def parse_assignments(items: list[str] | None) -> dict:
    """`key=value` pairs; values are parsed as YAML scalars (numbers, booleans, strings)."""
    return dict(parse_assignment(item) for item in items or [])


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_out(out: str) -> Path:
    """`--out` as a path that does not exist yet (or is an empty directory)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} already exists; choose another --out or remove it")
    return path


def attack_of(args) -> AttackSpec:
    return AttackSpec(args.attack, args.poison_rate, args.target, parse_assignments(args.set))


def cmd_train(args) -> int:
    out, attack = free_out(args.out), attack_of(args)
    if args.model:
        MODELS.get(args.model)
    overrides = {key: value for key, value in (("epochs", args.epochs), ("precision", args.precision))
                 if value is not None}
    spec = ExperimentSpec(dataset=args.dataset, data_dir=args.data_dir, model=args.model, profile=args.profile,
                          seed=args.seed, reserve_fraction=args.reserve_fraction,
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
    defense = DEFENSES.create(args.defense, profile, stages.augmentation_of(record), **parse_assignments(args.set))
    setup = stages.setup_of(record, args.data_dir)
    model, purified, tensors = stages.purify(args.defense, defense, backdoored, setup, record.seed, profile)
    store.save_stage(out, model, spec, purified, tensors)
    return saved(out, purified.metrics)


def audit_names(text: str) -> list[str]:
    """The checks asked for, in run order with the audits they take a model from (QRA: RA)."""
    checks = [c.strip() for c in text.split(",") if c.strip()]
    one_shot = [name for name in AUDITS.names() if "defense_run" not in AUDITS.get(name).needs]
    for check in checks:
        if check not in one_shot:
            raise UsageError(f"unknown check '{check}'; choose from: {', '.join(one_shot)} (trajectories need "
                             f"the defense run: use 'bdsafety run')")
    return with_dependencies(checks)


def cmd_audit(args) -> int:
    out, device, names = free_out(args.out), resolve_device(args.device), audit_names(args.checks)
    backdoored, spec = stages.load_model_stage(args.backdoored, device)
    subjects = {"backdoored": backdoored, "purified": stages.load_model_file(Path(args.purified), spec, device)}
    if args.clean:
        subjects["clean"] = stages.load_model_file(Path(args.clean), spec, device)
    record = backdoored.record
    methods = create_audits(names, stages.profile_of(args.profile, record), stages.augmentation_of(record))
    setup = stages.setup_of(record, args.data_dir)
    result = {"purified": evaluate_setup(subjects["purified"].model, setup),
              "backdoored": evaluate_setup(backdoored.model, setup),
              **stages.audit_models(methods, subjects, setup, record.seed)}
    store.publish_json(out, store.AUDIT_FILE, {"checks": names, "backdoored_dir": args.backdoored,
                                               "purified_path": args.purified, **result})
    print(format_metrics({"purified_asr": result["purified"]["asr"],
                          **{f"{name}_{key}": result[name][key] for name in names for key in ("asr", "asr_purified")
                             if key in result[name]}}))
    print(f"saved {out / store.AUDIT_FILE}")
    return 0


def cmd_run(args) -> int:
    return run_and_report(load_plan(args.spec, args.set), args)


DEMO_SPECS = {"quick": "quick.yaml", "full": "full.yaml", "default": "demo.yaml"}


def cmd_demo(args) -> int:
    if args.quick and args.full:
        raise UsageError("choose one of --quick and --full")
    name = DEMO_SPECS["quick" if args.quick else "full" if args.full else "default"]
    return run_and_report(load_plan(resources.files("bdsafety") / "configs" / name, args.set), args)


def run_and_report(plan, args) -> int:
    from .pipeline.run import dry_run, run_experiment

    out = Path(args.out)
    if args.dry_run:
        counts = dry_run(plan, out)
        print("\n".join(counts["cells"]))
        print(f"{len(counts['cells'])} cells, {counts['stages']} stages: {counts['compute']} to compute, "
              f"{counts['reuse']} stored in {out}")
        return 0
    from .report import write_report  # matplotlib: only when a report is written
    from .report.tables import console_table

    results = run_experiment(plan, out, resolve_device(args.device), executor_of(args))
    paths = write_report(out)
    print(console_table(results))
    print(f"results: {out / store.RESULTS_FILE}; report: "
          f"{', '.join(str(p) for p in paths if p.suffix in ('.md', '.html'))}")
    return 0


def executor_of(args):
    from .pipeline.executors import EXECUTORS

    if args.address and args.executor != "ray":
        raise UsageError("--address is the address of a Ray cluster; add --executor ray")
    return EXECUTORS.create(args.executor, **({"address": args.address} if args.address else {}))


def cmd_results(args) -> int:
    from .pipeline.table import results_rows, to_csv, to_jsonl

    rows = results_rows([Path(d) for d in args.dirs], parse_assignments(args.where))
    sys.stdout.write((to_jsonl if args.format == "jsonl" else to_csv)(rows))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    for path in write_report(Path(args.dir)):
        print(path)
    return 0


def cmd_import(args) -> int:
    from . import interop

    out, device, attack = free_out(args.out), resolve_device(args.device), attack_of(args)
    MODELS.get(args.model)
    data = ExperimentSpec(dataset=args.dataset, data_dir=args.data_dir, reserve_fraction=args.reserve_fraction).data
    setup = prepare(data, attack, args.seed, device=device)
    source = Path(args.file)
    state = interop.read_any(source, args.format, args.model, args.trust_pickle)
    model, record, tensors = stages.imported(state, source, args.format, args.model, setup, data, args.seed, device)
    store.save_stage(out, model, setup.model_spec(args.model), record, tensors)
    return saved(out, record.metrics)


def cmd_bench(args) -> int:
    """The speed benchmark lives in the source tree's benchmarks/ (it is not part of the library)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "speed.py").is_file():
        raise UsageError("bdsafety bench runs from a source checkout (its code is in benchmarks/, which is not "
                         "installed); clone the repository and run it there")
    sys.path.insert(0, str(root))
    from benchmarks.bench import main as bench_main

    return bench_main(args.bench_args)


def cmd_defenses(args) -> int:
    for name in DEFENSES.names():
        print(f"{name:12s} {summary(DEFENSES.get(name))}")
    return 0


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--data-dir", help="folder holding the dataset files (else $BDSAFETY_DATA, then system paths)")


def add_data_and_attack(parser: argparse.ArgumentParser, attack_help: str) -> None:
    parser.add_argument("--out", required=True, help="run directory to create")
    parser.add_argument("--dataset", default="fashion-mnist", choices=DATASET_NAMES, metavar="NAME",
                        help=f"one of {', '.join(DATASET_NAMES)}")
    parser.add_argument("--attack", default="badnets", help=attack_help)
    parser.add_argument("--poison-rate", type=float, default=0.05)
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reserve-fraction", type=float, default=0.05, help="defender's clean split (held out)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="attack parameter, e.g. alpha=0.1")
    add_common(parser)


def add_stage_commands(sub) -> None:
    train = sub.add_parser("train", help="train a backdoored (or clean) model and save it")
    add_data_and_attack(train, "attack name, or 'none' for a clean model")
    train.add_argument("--model", help=f"one of {', '.join(MODELS.names())} (default: the profile's)")
    train.add_argument("--profile", choices=PROFILES, help="cpu (small datasets) or paper")
    train.add_argument("--epochs", type=int, help="override the profile's epoch count")
    train.add_argument("--precision", choices=PRECISIONS,
                       help="fp32 (the profiles' default), bf16 autocast, or auto (bf16 where the hardware has it)")
    purify = sub.add_parser("purify", help="run a defense on a backdoored model and save the purified model")
    purify.add_argument("--from", dest="source", required=True, metavar="DIR", help="backdoored run directory")
    purify.add_argument("--defense", required=True, help="defense name (see 'bdsafety defenses')")
    purify.add_argument("--out", required=True, help="run directory to create")
    purify.add_argument("--profile", choices=PROFILES, help="default: the backdoored run's profile")
    purify.add_argument("--set", action="append", metavar="KEY=VALUE", help="hyperparameter, e.g. epochs=5")
    audit = sub.add_parser("audit", help="superficial-safety audit of a purified model (RA, QRA, LMC)")
    audit.add_argument("--backdoored", required=True, metavar="DIR", help="backdoored run directory")
    audit.add_argument("--purified", required=True, metavar="PATH",
                       help="purified run directory, .safetensors file or weights-only .pt state dict")
    audit.add_argument("--clean", metavar="PATH", help="clean reference model (needed by qra)")
    audit.add_argument("--out", required=True, help="directory to create, holding audit.json")
    audit.add_argument("--checks", default="ra,qra,lmc", help="comma-separated subset of ra,qra,lmc")
    audit.add_argument("--profile", choices=PROFILES, help="audit lengths (default: the backdoored run's)")
    for parser, handler in ((train, cmd_train), (purify, cmd_purify), (audit, cmd_audit)):
        if parser is not train:
            add_common(parser)
        parser.set_defaults(handler=handler)


def add_model_commands(sub) -> None:
    evaluate = sub.add_parser("eval", help="print clean accuracy and ASR of a saved model")
    evaluate.add_argument("dir", help="run directory (from 'bdsafety train' or 'purify')")
    add_common(evaluate)
    evaluate.set_defaults(handler=cmd_eval)
    imp = sub.add_parser("import", help="turn a weights file trained elsewhere into a bdsafety run directory")
    imp.add_argument("file", help=".safetensors, weights-only .pt/.pth state dict, or BackdoorBench result file")
    add_data_and_attack(imp, "the attack the model is suspected of (for ASR)")
    imp.add_argument("--model", required=True, help=f"architecture: one of {', '.join(MODELS.names())}")
    imp.add_argument("--format", choices=("state_dict", "backdoorbench"), default="state_dict")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow full unpickling of BackdoorBench files (runs code from the file: trusted sources only)")
    imp.set_defaults(handler=cmd_import)
    sub.add_parser("defenses", help="list the defenses").set_defaults(handler=cmd_defenses)


def add_experiment_commands(sub) -> None:
    run = sub.add_parser("run", help="run a whole experiment from a YAML spec (resumable)")
    run.add_argument("spec", help="YAML spec file")
    run.add_argument("--out", required=True, help="experiment directory (reused on rerun: finished stages skip)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="spec override, e.g. train.epochs=4")
    demo = sub.add_parser("demo", help="the built-in Fashion-MNIST experiment (BadNets 5%%, all defenses)")
    demo.add_argument("--out", required=True, help="experiment directory (reused on rerun)")
    demo.add_argument("--quick", action="store_true", help="a shorter first look (about 5 minutes)")
    demo.add_argument("--full", action="store_true",
                      help="the paper's four attacks (BadNets, Blended, SSBA, LC) with every defense: Table 1 in full")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="spec override")
    report = sub.add_parser("report", help="(re)write report.md / report.html from DIR/results.json")
    report.add_argument("dir", help="experiment directory")
    results = sub.add_parser("results", help="one table (csv or jsonl) of every audit in one or many run directories")
    results.add_argument("dirs", nargs="+", metavar="DIR", help="experiment directories (from 'bdsafety run')")
    results.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    results.add_argument("--where", action="append", metavar="KEY=VALUE", help="keep rows with this value, e.g. "
                                                                               "defense=pam (repeatable)")
    results.set_defaults(handler=cmd_results)
    for parser in (run, demo):
        parser.add_argument("--dry-run", action="store_true", help="print the cells and the stages to compute "
                                                                   "or reuse; compute nothing")
        parser.add_argument("--executor", choices=("local", "ray"), default="local",
                            help="local: one stage after another in this process (default); ray: every stage a "
                                 "Ray task (pip install 'bdsafety[ray]')")
        parser.add_argument("--address", help="with --executor ray: the Ray cluster (default: a local Ray "
                                               "instance on this machine)")
    for parser, handler in ((run, cmd_run), (demo, cmd_demo), (report, cmd_report)):
        add_common(parser)
        parser.set_defaults(handler=handler)
    bench = sub.add_parser("bench", add_help=False, help="speed benchmark (source checkout only; "
                                                         "'bdsafety bench --help' for its options)")
    bench.set_defaults(handler=cmd_bench)  # its own options are parsed by benchmarks/bench.py


def build_parser() -> Parser:
    parser = Parser(prog="bdsafety", description="Backdoor attacks, defenses and superficial-safety audits.")
    parser.add_argument("--version", action="version", version=f"bdsafety {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add_commands in (add_stage_commands, add_model_commands, add_experiment_commands):
        add_commands(sub)
    return parser


def thread_count() -> int:
    """$OMP_NUM_THREADS when set to a positive integer (to share a machine), else every available core."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else available_cores()


def configure(quiet: bool) -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING if quiet else logging.INFO)
    torch.set_num_threads(thread_count())


INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if args.command == "bench":
            args.bench_args = rest
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        configure(getattr(args, "quiet", False))
        return args.handler(args)
    except UsageError as exc:
        print(f"bdsafety: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bdsafety: interrupted; finished stages are kept, rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED


def entry() -> None:
    """The `bdsafety` command and `python -m bdsafety`: exit with main()'s status.

    After Ctrl-C the process leaves at once with 130: through the interpreter's shutdown it sometimes died of
    SIGINT instead (about 1 run in 7 on Python 3.11), although main() had handled the interrupt."""
    status = main()
    if status == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
