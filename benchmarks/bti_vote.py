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

from bdsafety.defenses import DEFENSES
from bdsafety.pipeline import stages
from bdsafety.train import training_augmentation


def vote(stage: Path, profile: str) -> dict:
    backdoored, _ = stages.load_model_stage(stage)
    record = backdoored.record
    backdoored.model = backdoored.model.to(memory_format=torch.channels_last)
    defense = DEFENSES.create("bti_dbf", profile, training_augmentation(record.params), nround=1, ul_round=0)
    started = time.perf_counter()
    _, result, _ = stages.purify("bti_dbf", defense, backdoored, stages.setup_of(record), record.seed, profile)
    history = result.details["history"]
    return {"attack": record.details["attack"]["name"], "precision": record.details["history"].get("precision", "fp32"),
            "true_target": record.details["attack"]["target"], "detected": history["target"],
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
