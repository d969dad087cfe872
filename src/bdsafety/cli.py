"""The `bdsafety` command: parses, calls the Python API, prints. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from importlib import resources
from pathlib import Path

import torch
import yaml

from . import __version__, interop, store
from .bench import profile_train, run_benchmark
from .bench_table import format_table
from .data import DATASET_NAMES
from .errors import UsageError
from .defenses import DEFENSES, create_defense, defense_params, summary
from .experiment import AttackSpec, DataSpec, evaluate_setup, prepare, purify, setup_from_record, setup_record, \
    setup_tensors, train_model
from .models import MODELS, create_model
from .report import write_report
from .run import Context, audit_purified, run_experiment
from .spec import ExperimentSpec, load_spec
from .profiles import MODEL_FOR_PROFILE, TRAIN_PROFILES, default_profile
from .train import PRECISIONS, resolve_device, training_augmentation

log = logging.getLogger("bdsafety")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as for every other bad input."""

    def error(self, message: str):
        raise UsageError(f"{message}; see '{self.prog} --help'")


def parse_assignments(items: list[str] | None) -> dict:
    """`key=value` pairs; values are parsed as YAML scalars (numbers, booleans, strings)."""
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got '{item}'")
        try:
            result[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"--set {key}: cannot parse value '{value}'") from None
    return result


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_out_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists; choose another --out or remove it")


def cmd_train(args) -> int:
    out = Path(args.out)
    check_out_free(out)
    profile = args.profile or default_profile(args.dataset)
    config = TRAIN_PROFILES[profile]
    overrides = {key: value for key, value in (("epochs", args.epochs), ("precision", args.precision))
                 if value is not None}
    config = dataclasses.replace(config, **overrides)
    model_name = args.model or MODEL_FOR_PROFILE[profile]
    MODELS.get(model_name)
    device = resolve_device(args.device)
    data = DataSpec(args.dataset, args.data_dir, args.reserve_fraction)
    attack = AttackSpec(args.attack, parse_assignments(args.set), args.poison_rate, args.target)
    setup = prepare(data, attack, args.seed, profile=profile, device=device)
    log.info("training %s on %s (%s, %d epochs, %s)", model_name, args.dataset, args.attack, config.epochs, device)
    model, result = train_model(setup, model_name, config, args.seed, device, progress=True)
    record = {"stage": "train", "model": model_name, "profile": profile, "train_config": config.to_json(),
              **setup_record(data, attack, args.seed, setup), **result}
    store.save_stage(out, model, setup.model_spec(model_name), record, setup_tensors(setup))
    print(format_metrics(result["metrics"]))
    print(f"saved {out}")
    return 0


def cmd_eval(args) -> int:
    model, _, record = store.load_stage(Path(args.dir), resolve_device(args.device))
    _, _, setup = setup_from_record(record, args.data_dir)
    print(format_metrics(evaluate_setup(model, setup)))
    return 0


def cmd_purify(args) -> int:
    out = Path(args.out)
    check_out_free(out)
    device = resolve_device(args.device)
    backdoored, spec, parent = store.load_stage(Path(args.source), device)
    profile = args.profile or parent.get("profile", "paper")
    defense = create_defense(args.defense, profile, parent_augmentation(parent), **parse_assignments(args.set))
    _, _, setup = setup_from_record(parent, args.data_dir)
    purified, result = purify(defense, backdoored, setup, parent["seed"])
    record = {"stage": "purify", "defense": args.defense, "profile": profile, "params": defense_params(defense),
              "parent": str(Path(args.source).resolve()), "parent_metrics": parent.get("metrics", {}),
              **{k: parent[k] for k in ("data", "attack", "seed", "model")}, **result}
    store.save_stage(out, purified, spec, record)
    print(format_metrics(result["metrics"]))
    print(f"saved {out}")
    return 0


def parent_augmentation(record: dict) -> dict | None:
    """The backdoored model's training augmentation from its record (imported models have none)."""
    return training_augmentation(record["train_config"]) if "train_config" in record else None


def load_purified(path: Path, spec, device) -> torch.nn.Module:
    """A purified model: a bdsafety run directory, or a weights file of the backdoored model's architecture."""
    if path.is_dir():
        model, other, _ = store.load_stage(path, device)
        if other != spec:
            raise UsageError(f"{path} is a {other.name} with {other.num_classes} classes, the backdoored model is "
                             f"a {spec.name} with {spec.num_classes}; audit models of the same architecture")
        return model
    model = create_model(spec)
    store.load_weights_into(model, store.read_state_dict(path), path)
    return model.to(device)


AUDIT_CHECKS = ("ra", "qra", "lmc")  # of one purified model; a trajectory needs its defense run


def cmd_audit(args) -> int:
    out = Path(args.out)
    check_out_free(out)
    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    for check in checks:
        if check not in AUDIT_CHECKS:
            raise UsageError(f"unknown check '{check}'; choose from: {', '.join(AUDIT_CHECKS)} (trajectories need "
                             f"the defense run: use 'bdsafety run')")
    device = resolve_device(args.device)
    backdoored, spec, record = store.load_stage(Path(args.backdoored), device)
    purified = load_purified(Path(args.purified), spec, device)
    clean = load_purified(Path(args.clean), spec, device) if args.clean else None
    _, _, setup = setup_from_record(record, args.data_dir)
    ctx = Context.of(ExperimentSpec(dataset=record["data"]["name"], model=spec.name, seed=record["seed"],
                                    profile=args.profile or record.get("profile"),
                                    train=parent_augmentation(record) or {}))
    result = audit_purified(backdoored, purified, clean, setup, checks, ctx)
    with store.publishing(out) as tmp:
        store.write_json(tmp / "audit.json", {"checks": list(checks), "backdoored_dir": args.backdoored,
                                              "purified": args.purified, **result, "versions": store.versions()})
    summary_line = {"purified_asr": result["purified"]["asr"]}
    if "ra" in result:
        summary_line["ra_asr"] = result["ra"]["asr"]
    if "qra" in result:
        summary_line["qra_asr_purified"] = result["qra"]["asr_purified"]
    print(format_metrics(summary_line))
    print(f"saved {out / 'audit.json'}")
    return 0


def cmd_run(args) -> int:
    spec = load_spec(args.spec, args.set)
    return run_and_report(spec, Path(args.out), args.device)


DEMO_SPECS = {"quick": "quick.yaml", "full": "full.yaml", "default": "demo.yaml"}


def cmd_demo(args) -> int:
    if args.quick and args.full:
        raise UsageError("choose one of --quick and --full")
    name = DEMO_SPECS["quick" if args.quick else "full" if args.full else "default"]
    spec = load_spec(resources.files("bdsafety") / "configs" / name, args.set)
    return run_and_report(spec, Path(args.out), args.device)


def run_and_report(spec, out: Path, device_name: str) -> int:
    results = run_experiment(spec, out, resolve_device(device_name))
    paths = write_report(out)
    print(results_table(results))
    print(f"results: {out / 'results.json'}; report: {', '.join(str(p) for p in paths if p.suffix in ('.md', '.html'))}")
    return 0


def results_table(results: dict) -> str:
    """One small text table per results block (attack, poison rate, target, seed)."""
    blocks = results.get("attacks") or [results]
    return "\n".join(block_table(block, len(blocks) > 1) for block in blocks)


def block_table(block: dict, titled: bool) -> str:
    title = f"{block.get('attack')} {block.get('poison_rate')} t={block.get('target')} seed {block.get('seed')}: "
    lines = [f"{title if titled else ''}backdoored: {format_metrics(block['backdoored'])}",
             "defense   o_acc  o_asr  p_acc  p_asr  qra_asr"]
    for row in block["rows"]:
        cells = [row.get(k) for k in ("o_clean_acc", "o_asr", "p_clean_acc", "p_asr", "qra_asr_purified")]
        lines.append(f"{row['defense']:9s} " + "  ".join("  -  " if v is None else f"{v:.3f}" for v in cells))
    return "\n".join(lines)


def cmd_report(args) -> int:
    for path in write_report(Path(args.dir)):
        print(path)
    return 0


def cmd_import(args) -> int:
    out = Path(args.out)
    check_out_free(out)
    MODELS.get(args.model)
    data = DataSpec(args.dataset, args.data_dir, args.reserve_fraction)
    attack = AttackSpec(args.attack, parse_assignments(args.set), args.poison_rate, args.target)
    setup = prepare(data, attack, args.seed, device=resolve_device(args.device))
    spec = setup.model_spec(args.model)
    model = create_model(spec)
    source = Path(args.file)
    store.load_weights_into(model, interop.read_any(source, args.format, args.model, args.trust_pickle), source)
    model = model.to(resolve_device(args.device))
    metrics = evaluate_setup(model, setup)
    record = {"stage": "import", "source": str(source.resolve()), "format": args.format, "model": args.model,
              **setup_record(data, attack, args.seed, setup), "metrics": metrics}
    store.save_stage(out, model, spec, record, setup_tensors(setup))
    print(format_metrics(metrics))
    print(f"saved {out}")
    return 0


def cmd_bench(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    result = run_benchmark(device, seconds_per_case=args.seconds)
    if args.profile:
        result["profile"] = profile_train(device)
    store.write_json(Path(args.out) / "bench.json", result)
    print(format_table(result))
    for row in result.get("profile", []):
        print(f"{row['self_cpu_ms']:8.2f} ms/step {100 * row['share']:5.1f} %  {row['op']}")
    print(f"written to {Path(args.out) / 'bench.json'} ({result['total_s']:.0f} s)")
    return 0


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


def add_train_command(sub) -> None:
    train = sub.add_parser("train", help="train a backdoored (or clean) model and save it")
    train.add_argument("--dataset", default="fashion-mnist", choices=DATASET_NAMES, metavar="NAME",
                       help=f"one of {', '.join(DATASET_NAMES)}")
    train.add_argument("--attack", default="badnets", help="attack name, or 'none' for a clean model")
    train.add_argument("--out", required=True, help="run directory to create")
    train.add_argument("--model", help=f"one of {', '.join(MODELS.names())} (default: the profile's)")
    train.add_argument("--profile", choices=sorted(TRAIN_PROFILES), help="cpu (small datasets) or paper")
    train.add_argument("--epochs", type=int, help="override the profile's epoch count")
    train.add_argument("--precision", choices=PRECISIONS,
                       help="fp32 (the profiles' default), bf16 autocast, or auto (bf16 where the hardware has it)")
    train.add_argument("--poison-rate", type=float, default=0.05)
    train.add_argument("--target", type=int, default=0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--reserve-fraction", type=float, default=0.05, help="defender's clean split (held out)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="attack parameter, e.g. alpha=0.1")
    add_common(train)
    train.set_defaults(handler=cmd_train)


def add_eval_command(sub) -> None:
    evaluate = sub.add_parser("eval", help="print clean accuracy and ASR of a saved model")
    evaluate.add_argument("dir", help="run directory (from 'bdsafety train' or 'purify')")
    add_common(evaluate)
    evaluate.set_defaults(handler=cmd_eval)


def add_purify_command(sub) -> None:
    purify_cmd = sub.add_parser("purify", help="run a defense on a backdoored model and save the purified model")
    purify_cmd.add_argument("--from", dest="source", required=True, metavar="DIR", help="backdoored run directory")
    purify_cmd.add_argument("--defense", required=True, help="defense name (see 'bdsafety defenses')")
    purify_cmd.add_argument("--out", required=True, help="run directory to create")
    purify_cmd.add_argument("--profile", choices=("paper", "cpu"), help="default: the backdoored run's profile")
    purify_cmd.add_argument("--set", action="append", metavar="KEY=VALUE", help="hyperparameter, e.g. epochs=5")
    add_common(purify_cmd)
    purify_cmd.set_defaults(handler=cmd_purify)


def add_defenses_command(sub) -> None:
    defenses = sub.add_parser("defenses", help="list the defenses")
    defenses.set_defaults(handler=cmd_defenses)


def add_audit_command(sub) -> None:
    audit = sub.add_parser("audit", help="superficial-safety audit of a purified model (RA, QRA, LMC)")
    audit.add_argument("--backdoored", required=True, metavar="DIR", help="backdoored run directory")
    audit.add_argument("--purified", required=True, metavar="PATH",
                       help="purified run directory, .safetensors file or weights-only .pt state dict")
    audit.add_argument("--clean", metavar="PATH", help="clean reference model (needed by qra)")
    audit.add_argument("--out", required=True, help="directory to create, holding audit.json")
    audit.add_argument("--checks", default="ra,qra,lmc", help="comma-separated subset of ra,qra,lmc")
    audit.add_argument("--profile", choices=("paper", "cpu"), help="audit lengths (default: the backdoored run's)")
    add_common(audit)
    audit.set_defaults(handler=cmd_audit)


def add_import_command(sub) -> None:
    imp = sub.add_parser("import", help="turn a weights file trained elsewhere into a bdsafety run directory")
    imp.add_argument("file", help=".safetensors, weights-only .pt/.pth state dict, or BackdoorBench result file")
    imp.add_argument("--out", required=True, help="run directory to create")
    imp.add_argument("--model", required=True, help=f"architecture: one of {', '.join(MODELS.names())}")
    imp.add_argument("--format", choices=("state_dict", "backdoorbench"), default="state_dict")
    imp.add_argument("--dataset", default="fashion-mnist", choices=DATASET_NAMES, metavar="NAME")
    imp.add_argument("--attack", default="badnets", help="the attack the model is suspected of (for ASR)")
    imp.add_argument("--poison-rate", type=float, default=0.05)
    imp.add_argument("--target", type=int, default=0)
    imp.add_argument("--seed", type=int, default=0)
    imp.add_argument("--reserve-fraction", type=float, default=0.05)
    imp.add_argument("--set", action="append", metavar="KEY=VALUE", help="attack parameter")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow full unpickling of BackdoorBench files (runs code from the file: trusted sources only)")
    add_common(imp)
    imp.set_defaults(handler=cmd_import)


def add_run_command(sub) -> None:
    run = sub.add_parser("run", help="run a whole experiment from a YAML spec (resumable)")
    run.add_argument("spec", help="YAML spec file")
    run.add_argument("--out", required=True, help="experiment directory (reused on rerun: finished stages skip)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="spec override, e.g. train.epochs=4")
    add_common(run)
    run.set_defaults(handler=cmd_run)


def add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="the built-in Fashion-MNIST experiment (BadNets 5%%, all defenses)")
    demo.add_argument("--out", required=True, help="experiment directory (reused on rerun)")
    demo.add_argument("--quick", action="store_true", help="a shorter first look (about 5 minutes)")
    demo.add_argument("--full", action="store_true",
                      help="the paper's four attacks (BadNets, Blended, SSBA, LC) with every defense: Table 1 in full")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="spec override")
    add_common(demo)
    demo.set_defaults(handler=cmd_demo)


def add_bench_command(sub) -> None:
    bench = sub.add_parser("bench", help="speed benchmark: training loop vs a PIL/DataLoader pipeline, MFU, PAM, eval")
    bench.add_argument("--out", default=".", help="directory for bench.json (default: the current one)")
    bench.add_argument("--seconds", type=float, default=12.0, help="timed seconds per case (default 12)")
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default: every available core)")
    bench.add_argument("--profile", action="store_true", help="also profile a few training steps (top ops)")
    add_common(bench)
    bench.set_defaults(handler=cmd_bench)


def add_report_command(sub) -> None:
    report = sub.add_parser("report", help="(re)write report.md / report.html from DIR/results.json")
    report.add_argument("dir", help="experiment directory")
    add_common(report)
    report.set_defaults(handler=cmd_report)


def build_parser() -> Parser:
    parser = Parser(prog="bdsafety", description="Backdoor attacks, defenses and superficial-safety audits.")
    parser.add_argument("--version", action="version", version=f"bdsafety {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add_command in (add_train_command, add_eval_command, add_purify_command, add_defenses_command,
                        add_audit_command, add_import_command, add_run_command, add_demo_command,
                        add_bench_command, add_report_command):
        add_command(sub)
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
        args = build_parser().parse_args(argv)
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

    After Ctrl-C the process leaves at once with 130. Through the interpreter's shutdown it sometimes died of
    SIGINT instead, although main() had handled the interrupt: about 1 run in 7 on Python 3.11, when the
    interrupt landed in one of the imports that the first training step still makes. Finished stages are on disk;
    an unfinished stage's hidden temp files are removed by the next run."""
    status = main()
    if status == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
