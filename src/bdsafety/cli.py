"""The `bdsafety` command line: the parser and the entry point. What each command does is in `commands.py`.
Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from . import __version__
from .commands import (cmd_audit, cmd_defenses, cmd_demo, cmd_eval, cmd_export, cmd_import, cmd_purify, cmd_report,
                       cmd_results, cmd_run, cmd_train)
from .data import DATASET_NAMES
from .errors import UsageError
from .models import MODELS
from .pipeline import progress
from .registry import PROFILES
from .train import PRECISIONS


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as for every other bad input."""

    def error(self, message: str):
        raise UsageError(f"{message}; see '{self.prog} --help'")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)



def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--data-dir", help="folder holding the dataset files (else $BDSAFETY_DATA, then system paths)")
    parser.add_argument("--model-factory", metavar="PACKAGE.MODULE:FUNCTION",
                        help="your own architecture: imports your module (this runs its code) and builds models "
                             "with FUNCTION(in_channels, num_classes, mean, std), an nn.Module taking [0, 1] images; "
                             "models saved with it need the same flag to load")


def add_data_and_attack(parser: argparse.ArgumentParser, attack_help: str) -> None:
    parser.add_argument("--out", required=True, help="run directory to create")
    parser.add_argument("--dataset", default="fashion-mnist", choices=DATASET_NAMES, metavar="NAME",
                        help=f"one of {', '.join(DATASET_NAMES)}")
    parser.add_argument("--attack", default="badnets", help=attack_help)
    parser.add_argument("--poison-rate", type=float, default=0.05)
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--labels", default="all2one", choices=("all2one", "all2all"),
                        help="relabel poisons to the target (all2one) or class y to (y + 1) mod C (all2all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defender-data", choices=("official", "held_out"), default="official",
                        help="official: each defense draws its share (FT, FST 2%%; most 5%%; BTI-DBF, PAM 2,500 "
                             "images) from the clean images the model trained on; held_out: one reserve kept out of "
                             "training")
    parser.add_argument("--reserve-fraction", type=float, default=0.05,
                        help="with --defender-data held_out: the reserve's share")
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
    audit = sub.add_parser("audit", help="superficial-safety audit of a purified model (RA, QRA, LMC), with the "
                                         "attacker's own poisons")
    models = audit.add_argument_group("the models: each a run directory, a .safetensors file, a weights-only .pt "
                                      "state dict or a BackdoorBench result file")
    models.add_argument("--purified", metavar="PATH", help="the model to audit (with --backdoorbench: default every "
                                                           "defense_result.pt of the record)")
    models.add_argument("--backdoored", metavar="PATH",
                        help="the model before the defense; needed by lmc, position and bec, and by the check that "
                             "the poisons are its backdoor (with --backdoorbench: the record's attack_result.pt)")
    models.add_argument("--clean", metavar="PATH|train", help="clean reference model (needed by qra); 'train' trains "
                                                              "one of the same architecture on the dataset (cached)")
    models.add_argument("--model", help=f"architecture of weights files that do not name it: one of "
                                        f"{', '.join(MODELS.names())}")
    models.add_argument("--dataset", choices=DATASET_NAMES, metavar="NAME", help="where no input names it")
    poisons = audit.add_argument_group("where the poisons come from (default: the bdsafety attack that a run "
                                       "directory's record names; without one the audit is refused)")
    poisons.add_argument("--backdoorbench", metavar="RECORD_DIR", help="a BackdoorBench record folder "
                         "(record/<name>/: attack_result.pt, bd_train_dataset/, bd_test_dataset/, defense/)")
    poisons.add_argument("--poisons-train", metavar="DIR", help="poisoned training images, DIR/<attack label>/<images>")
    poisons.add_argument("--poisons-test", metavar="DIR", help="poisoned test images, DIR/<attack label>/<images>")
    poisons.add_argument("--trigger", metavar="PNG", help="trigger pattern: x' = (1 - alpha*m)*x + alpha*m*t")
    poisons.add_argument("--trigger-mask", metavar="PNG", help="the trigger's mask m (grey levels, the trigger's size)")
    poisons.add_argument("--trigger-alpha", type=float, metavar="A", help="blend alpha in (0, 1] (default 1)")
    poisons.add_argument("--target", type=int, help="the trigger's target class (with --trigger)")
    poisons.add_argument("--labels", choices=("all2one", "all2all"),
                         help="with --trigger or poison folders: all2one (default) or all2all ((y + 1) mod C)")
    poisons.add_argument("--audit-anyway", action="store_true",
                         help="audit even when the backdoored model does not follow the poisons (ASR < 50%%); "
                              "the card then says so")
    audit.add_argument("--out", required=True, help="directory to create, holding audit.json")
    audit.add_argument("--checks", default="ra,qra,lmc",
                       help="comma-separated: ra, qra, lmc, ra_curve, position, bec, uap, or 'all'")
    audit.add_argument("--profile", choices=PROFILES, help="audit lengths (default: the backdoored run's, else the "
                                                           "dataset's)")
    audit.add_argument("--seed", type=int, default=0, help="the audit's seed (a run directory's record sets its own)")
    audit.add_argument("--set", action="append", metavar="AUDIT.KEY=VALUE",
                       help="an audit's parameter, e.g. lmc.test_images=0 (the CPU profile scans LMC's 21 points on "
                            "2,000 + 2,000 test images; the paper profile on all)")
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
    imp.add_argument("file", help=".safetensors, weights-only .pt/.pth state dict, or BackdoorBench result file "
                                  "(attack_result.pt / defense_result.pt: read without running code from it)")
    add_data_and_attack(imp, "the bdsafety attack that made the model (required; 'none': a clean model); a "
                             "BackdoorBench attack result is compared with it and refused unless its saved poisons "
                             "are that attack's")
    imp.add_argument("--model", help=f"architecture: one of {', '.join(MODELS.names())} (needed for a state "
                                     "dict; a BackdoorBench file names its own)")
    imp.add_argument("--format", choices=("state_dict", "backdoorbench"), default="state_dict")
    imp.set_defaults(handler=cmd_import, attack=None)
    export = sub.add_parser("export", help="write a saved model in another toolkit's format")
    export.add_argument("dir", help="run directory of the model (from 'bdsafety train', 'purify' or 'import')")
    export.add_argument("--format", choices=("backdoorbench",), default="backdoorbench",
                        help="backdoorbench: a defense_result.pt dict (model_name, num_classes, model state dict)")
    export.add_argument("--out", required=True, help="file to create, e.g. defense_result.pt")
    export.set_defaults(handler=cmd_export)
    sub.add_parser("defenses", help="list the defenses").set_defaults(handler=cmd_defenses)


def add_experiment_commands(sub) -> None:
    run = sub.add_parser("run", help="run a whole experiment from a YAML spec (resumable)")
    run.add_argument("spec", help="YAML spec file")
    run.add_argument("--out", required=True, help="experiment directory (reused on rerun: finished stages skip)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="spec override, e.g. train.epochs=4")
    demo = sub.add_parser("demo", help="the built-in Fashion-MNIST experiment (BadNets 5%%, all defenses)")
    demo.add_argument("--out", required=True, help="experiment directory (reused on rerun)")
    demo.add_argument("--quick", action="store_true", help="a shorter first look (about 5 minutes on 2 cores)")
    demo.add_argument("--full", action="store_true",
                      help="the paper's four attacks (BadNets, Blended, SSBA, LC) with every defense: Table 1 in full")
    demo.add_argument("--practitioner", action="store_true",
                      help="add the practitioner's audits (attacker-budget curve, weight-space position, backdoor "
                           "existence, universal re-activation and its transfer) to the demo's RA, QRA, LMC and "
                           "trajectories")
    demo.add_argument("--attacks", action="store_true",
                      help="the attacks beyond the paper's that implant on Fashion-MNIST (Adap-Blend, LF, "
                           "TrojanNN, Input-aware) with the paper's defenses")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="spec override")
    report = sub.add_parser("report", help="(re)write report.md / report.html from DIR/results.json; with --docs, a "
                                           "results page of the documentation site from one or more runs")
    report.add_argument("dirs", nargs="+", metavar="DIR", help="experiment directory (with --docs, one section each)")
    report.add_argument("--docs", metavar="PAGE.md",
                        help="write this page (e.g. docs/results/NAME.md) and its figures (in PAGE/) instead, and list "
                             "a new page in docs/results/index.md and mkdocs.yml's nav")
    report.add_argument("--title", help="with --docs: the page's title (default: its name)")
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
    """Log to stderr; on a terminal with a live progress line at the bottom (pipeline/progress.py)."""
    live = sys.stderr.isatty() and not quiet
    output = {"handlers": [progress.use_status_line(sys.stderr)]} if live else {"stream": sys.stderr}
    logging.basicConfig(format="%(message)s", **output)
    logging.getLogger().setLevel(logging.WARNING if quiet else logging.INFO)
    torch.set_num_threads(thread_count())


def use_model_factory(args) -> None:
    """Register --model-factory's function for this command only; `train` and `import` then build it."""
    from .models.factory import FACTORIES, register_factory

    FACTORIES.clear()
    if not getattr(args, "model_factory", None):
        return

    name = register_factory(args.model_factory)
    if hasattr(args, "model"):
        if args.model not in (None, name):
            raise UsageError(f"pass --model or --model-factory, not both (got --model {args.model})")
        args.model = name


INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        configure(getattr(args, "quiet", False))
        use_model_factory(args)
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
