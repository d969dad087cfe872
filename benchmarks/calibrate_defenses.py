"""The strength rule of the CPU profile, measured: each defense on a small grid, chosen on the calibration split.

    python benchmarks/calibrate_defenses.py RUN_DIR [--defenses fst,i_bau,anp,ft_sam,pam,bti_dbf] [--out FILE.json]
    python benchmarks/calibrate_defenses.py RUN_DIR --seeds 0,1,2 --defenses i_bau,anp   # the rule on every seed
    python benchmarks/calibrate_defenses.py RUN_DIR --point pam '{"uround": 10}'   # one setting, with RA
    python benchmarks/calibrate_defenses.py --markdown FILE.json   # the saved grids as a docs table

RUN_DIR is a `bdsafety run` / `demo` directory whose spec has a calibration split (`calibration_fraction`;
demo: 2 % of the training images, held out of backdoor training and of the defender's reserve). Its
backdoored model is purified with each setting of a defense's grid, from the official setting (the paper
repository's value) up in strength, until one reaches O-ASR <= 10 % on the triggered calibration images:
that one is the rule's choice. With `--seeds`, a setting is chosen only when it reaches the rule on every
listed seed's calibration split (each seed's backdoored model and split; the walk stops measuring a setting at
its first seed above the limit), since the profile applies one setting to every seed. Where the CPU profile is
shorter than the official length, the choice (or, when none purified, the strongest point) is also run once at
the official length (on the first seed). The test set's C-Acc
and O-ASR, and RA's P-ASR for the chosen and the official-length points, are printed beside each point
for the README, never used to choose.

Every point is a stage of the run's own store (the pipeline's defense and RA stages), so a later
`bdsafety run` / `demo` with the chosen setting reuses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from bdsafety import store
from bdsafety.data import load_dataset
from bdsafety.pipeline import build_plan, load_spec
from bdsafety.pipeline.graph import audit_node, purify_node, train_node
from bdsafety.pipeline.context import RunContext, run_node

CALIBRATION_ASR = 0.10  # the rule: the weakest grid setting with O-ASR at most this on the calibration split

# Per defense: its settings in order of strength (the first is the official one, or the CPU length where that
# is shorter), and the official length where the CPU profile is shorter than it.
GRIDS = {
    "fst": {"grid": [{"epochs": 10}, {"epochs": 20}, {"epochs": 30}]},
    # BackdoorBench's Adam 1e-4 without a ball, then the L2 ball of radius 10 and larger rates (I-BAU's code: 1e-3)
    "i_bau": {"grid": [{"lr": 1e-4, "perturbation_norm": None}, {"lr": 1e-4, "perturbation_norm": 10.0},
                       {"lr": 3e-4, "perturbation_norm": 10.0}, {"lr": 1e-3, "perturbation_norm": 10.0}]},
    # BackdoorBench's mask lr 0.01, then the ANP paper's 0.2 with the pruning threshold raised step by step
    "anp": {"grid": [{"mask_lr": 0.01, "prune_threshold": 0.2}, {"mask_lr": 0.2, "prune_threshold": 0.2},
                     {"mask_lr": 0.2, "prune_threshold": 0.3}, {"mask_lr": 0.2, "prune_threshold": 0.4},
                     {"mask_lr": 0.2, "prune_threshold": 0.5}],
            "official": {"iterations": 2000}},
    "ft_sam": {"grid": [{"epochs": 30}, {"epochs": 100}], "official": {"epochs": 100}},
    # The trigger inversion's length at the official U-Net width 32: the previous CPU length (2 / 5 / 1), then
    # 5 / 20 / 5. (docs/calibration.md also has the earlier grids: width 8, and at 2 / 5 / 1 epochs the authors'
    # tips, a larger share of inverted samples and a larger rho, and the official unlearning length.)
    "pam": {"grid": [{"preround": 2, "mround": 5, "uround": 1}, {"preround": 5, "mround": 20, "uround": 5}],
            "official": {"preround": 50, "uround": 30, "nround": 3, "ul_round": 30}},
    "bti_dbf": {"grid": [{"preround": 5, "mround": 20, "uround": 5}],
                "official": {"preround": 50, "uround": 30, "nround": 3, "ul_round": 30}},
    # The six defenses beyond the paper. FP: BackdoorBench's 10 % tolerated accuracy drop, then more pruning.
    "fp": {"grid": [{"max_acc_drop": 0.1}, {"max_acc_drop": 0.2}, {"max_acc_drop": 0.3}], "official": {"epochs": 100}},
    # NAD: the official 10 + 10 epochs, then longer distillation, then doubled attention weights.
    "nad": {"grid": [{"epochs": 10}, {"epochs": 20}, {"epochs": 20, "beta1": 1000.0, "beta2": 2000.0,
                                                      "beta3": 2000.0}]},
    # CLP: the paper's u = 3, then lower outlier thresholds (more channels pruned); data-free, no length to cut.
    "clp": {"grid": [{"u": 3.0}, {"u": 2.5}, {"u": 2.0}, {"u": 1.5}]},
    # SAU: the CPU length (5 of the official 100 epochs), then 10 and 20.
    "sau": {"grid": [{"epochs": 5}, {"epochs": 10}, {"epochs": 20}], "official": {"epochs": 100}},
    # MCR: BackdoorBench's t = 0.1 on its curve, then further from the backdoored end.
    "mcr": {"grid": [{"t": 0.1}, {"t": 0.2}, {"t": 0.3}, {"t": 0.4}, {"t": 0.5}],
            "official": {"finetune_epochs": 100, "epochs": 100}},
    # TSC: 6 epochs per curve (the official 200), then 12 and 24.
    "tsc": {"grid": [{"epochs": 6}, {"epochs": 12}, {"epochs": 24}], "official": {"epochs": 200, "finetune_epochs": 10}},
}


class Calibration:
    """The run's store and backdoored model, and a defense stage for any parameter setting."""

    def __init__(self, run_dir: Path, seeds: list[int] | None = None):
        self.spec = load_spec(run_dir / "spec.yaml")
        if not self.spec.calibration_fraction:
            sys.exit(f"{run_dir}'s spec has no calibration split; set calibration_fraction and rerun it")
        self.seeds = seeds or [self.spec.resolved_seeds[0]]
        unknown = sorted(set(self.seeds) - set(self.spec.resolved_seeds))
        if unknown:
            sys.exit(f"{run_dir}'s spec has no seed {unknown}; list its seeds ({self.spec.resolved_seeds}) in --seeds")
        self.runs = store.RunStore(run_dir, torch.device("cpu"))
        plan = build_plan(self.spec)
        self.attack = self.spec.attacks[0]
        self.bundle = load_dataset(self.spec.dataset, self.spec.data_dir, seed=self.spec.seed)
        self.context = RunContext(plan, self.bundle, torch.device("cpu"))
        self.nodes = {seed: train_node(plan, self.attack, seed, self.attack.label) for seed in self.seeds}
        self.backdoored = {seed: run_node(node, self.context, self.runs, {}) for seed, node in self.nodes.items()}

    def measure(self, name: str, params: dict, with_ra: bool, seed: int | None = None) -> dict:
        started = time.perf_counter()
        seed = self.seeds[0] if seed is None else seed
        plan = build_plan(dataclasses.replace(self.spec, defenses=(name,), defense_params={name: params}))
        context = RunContext(plan, self.bundle, torch.device("cpu"))
        context.setups = self.context.setups  # the same data and attack: built once
        trained = self.nodes[seed]
        node = purify_node(plan, trained, name)
        done = {trained.key: self.backdoored[seed]}
        purified = done[node.key] = run_node(node, context, self.runs, done)
        metrics = purified.record.metrics
        point = {"params": params, "seed": seed, "calibration_asr": metrics["calibration_asr"],
                 "calibration_clean_acc": metrics["calibration_clean_acc"], "test_clean_acc": metrics["clean_acc"],
                 "test_asr": metrics["asr"], **purified.record.details["strength"],
                 "defense_s": purified.record.duration_s}
        if with_ra:
            ra = audit_node(plan, "ra", {"purified": node}, trained, node.label)
            retuned = run_node(ra, context, self.runs, done).record.metrics
            point.update(test_p_asr=retuned["asr"], test_p_asr_sd=retuned["asr_sd"])
        report(name, point, time.perf_counter() - started)
        return point

    def calibrate(self, name: str, official_length: bool, max_points: int | None = None) -> dict:
        """Walk the grid from its first setting up (at most `max_points` of it), each setting on every seed until one
        is above the limit; RA's P-ASR is measured for the chosen point only (on every seed)."""
        grid = GRIDS[name]
        points, chosen, walked = [], None, 0
        for params in grid["grid"][:max_points]:
            walked += 1
            measured = []
            for seed in self.seeds:
                measured.append(self.measure(name, params, with_ra=False, seed=seed))
                if measured[-1]["calibration_asr"] > CALIBRATION_ASR:
                    break
            if all(point["calibration_asr"] <= CALIBRATION_ASR for point in measured):
                chosen = params
                measured = [self.measure(name, params, with_ra=True, seed=seed) for seed in self.seeds]
            points.extend(measured)
            if chosen is not None:
                break
        out = {"grid": grid["grid"], "seeds": self.seeds, "points": points, "chosen": chosen}
        official = {**(chosen or grid["grid"][-1]), **grid.get("official", {})}
        if official_length and "official" in grid and official not in grid["grid"][:walked]:
            out["official_length"] = self.measure(name, official, with_ra=True)
        return out


def report(name: str, point: dict, seconds: float) -> None:
    p_asr = f"P-ASR {100 * point['test_p_asr']:5.1f} ± {100 * point['test_p_asr_sd']:.1f}" \
        if "test_p_asr" in point else "P-ASR   n/a"
    print(f"{name:7s} seed {point['seed']} {json.dumps(point['params']):50s} "
          f"cal O-ASR {100 * point['calibration_asr']:5.1f}  "
          f"cal C-Acc {100 * point['calibration_clean_acc']:5.1f} | test C-Acc {100 * point['test_clean_acc']:5.1f}  "
          f"O-ASR {100 * point['test_asr']:5.1f}  {p_asr}  dist {point['relative_distance']:.3f}  "
          f"steps {point['optimizer_steps']}  defense {point['defense_s']:.0f} s ({seconds:.0f} s here)", flush=True)


def markdown(saved: dict) -> str:
    """The saved grids as a Markdown table, under a header naming the command, commit and machine."""
    env = saved.get("environment") or {}
    lines = [f"command: `{env.get('command', 'not recorded')}`  ", f"commit: {env.get('commit', 'not recorded')}"
             f"{' (with uncommitted changes)' if env.get('dirty') else ''}; machine: {env.get('cpu')}, "
             f"{env.get('threads')} threads, torch {env.get('torch')}; date: {env.get('date')}  ",
             f"rule: {saved['rule']}; the test set's numbers and RA's P-ASR are shown, never used to choose", "",
             "| defense | grid point | seed | calibration O-ASR | test C-Acc / O-ASR | P-ASR (RA draws) | distance "
             "| steps |",
             "|---|---|---|---|---|---|---|---|"]
    for name, found in saved["defenses"].items():
        points = found["points"] + ([found["official_length"]] if "official_length" in found else [])
        for point in points:
            chosen = point["params"] == found["chosen"]
            p_asr = f"{100 * point['test_p_asr']:.1f} ± {100 * point['test_p_asr_sd']:.1f}" if "test_p_asr" in point \
                else ""
            cal = f"{100 * point['calibration_asr']:.2f}"
            lines.append(f"| {name} | {'**' if chosen else ''}{json.dumps(point['params'])}{'**' if chosen else ''} | "
                         f"{point.get('seed', (saved.get('seeds') or ['?'])[0])} | {cal} | "
                         f"{100 * point['test_clean_acc']:.1f} / {100 * point['test_asr']:.1f} | {p_asr} | "
                         f"{point['relative_distance']:.3f} | {point['optimizer_steps']} |")
        if found["chosen"] is None:
            lines.append(f"| {name} | no grid point reached the rule | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if "--markdown" in sys.argv[1:2]:
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--defenses", default=",".join(GRIDS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-official-length", action="store_true", help="no run at the official length")
    parser.add_argument("--point", nargs=2, metavar=("DEFENSE", "JSON"), help="measure one setting (with RA) and stop")
    parser.add_argument("--max-points", type=int, help="walk at most this many points of each grid (time budget)")
    parser.add_argument("--seeds", help="comma-separated seeds of the run: a setting must reach the rule on each "
                                        "(default: the run's first seed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    calibration = Calibration(args.run_dir, [int(seed) for seed in args.seeds.split(",")] if args.seeds else None)
    if args.point:
        point = calibration.measure(args.point[0], json.loads(args.point[1]), with_ra=True)
        if args.out:
            store.write_json(args.out, {"backdoored": calibration.backdoored[calibration.seeds[0]].key, "point": point})
        return
    results = {}
    for name in args.defenses.split(","):
        results[name] = calibration.calibrate(name, not args.skip_official_length, args.max_points)
        if args.out:  # after each defense, so an interrupted calibration keeps what it measured
            store.write_json(args.out, {"rule": f"weakest grid setting with calibration O-ASR <= {CALIBRATION_ASR}",
                                        "backdoored": {seed: model.key
                                                       for seed, model in calibration.backdoored.items()},
                                        "seeds": calibration.seeds, "defenses": results,
                                        "environment": store.environment("cpu")})


if __name__ == "__main__":
    main()
