"""BTI-DBF(U)'s target vote (stage A, then round 0's mask, generator and vote) on stored backdoored models.

    python benchmarks/bti_vote.py STAGE_DIR [STAGE_DIR ...] [--profile cpu]

Each STAGE_DIR is a backdoored model written by `bdsafety train` (or a `stages/train-<attack>-...` folder of a
run). The vote is the one BTI-DBF(U) and PAM take in their first round with the same seeds (so it is the
vote of a `bdsafety run` of that model); the unlearning that follows it is skipped. Prints the attack, the
model's training precision, the true and the detected target, the votes and the winner's margin.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from bdsafety import store
from bdsafety.defenses import create_defense
from bdsafety.experiment import purify, setup_from_record
from bdsafety.train import training_augmentation


def vote(stage: Path, profile: str) -> dict:
    model, _, record = store.load_stage(stage)
    _, _, setup = setup_from_record(record)
    defense = create_defense("bti_dbf", profile, training_augmentation(record["train_config"]), nround=1, ul_round=0)
    started = time.perf_counter()
    _, result = purify(defense, model.to(memory_format=torch.channels_last), setup, record["seed"])
    history = result["history"]
    return {"attack": record["attack"]["name"], "precision": record["history"].get("precision", "fp32"),
            "true_target": record["attack"]["target"], "detected": history["target"],
            "votes": history["target_votes"], "margin": history["target_vote_margin"],
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", type=Path, nargs="+")
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    for stage in args.stages:
        r = vote(stage, args.profile)
        verdict = "found" if r["detected"] == r["true_target"] else "WRONG"
        print(f"{r['attack']:8s} {r['precision']:5s} target {r['true_target']} detected {r['detected']} ({verdict}), "
              f"margin {100 * r['margin']:.1f} %, votes {r['votes']}, {r['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
