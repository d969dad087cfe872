"""Results over several seeds: one block per (attack, poison rate, target), every number its mean with spread.

Pure functions over `results.json` content. Each numeric field becomes the mean over seeds, with the
sample standard deviation, minimum and maximum beside it (`<key>_sd`, `<key>_min`, `<key>_max`). Fields
that hold every repeat of a measurement (`<key>_repeats`, the Retuning Attack's draws) are pooled over
the seeds, and then the mean and spread of `<key>` are those of all pooled draws. Curves (LMC, the
defense trajectories) are averaged point by point. A field with the same value for every seed (attack,
rate, target, grid positions) is kept as it is, without spread. Lists of the same length (curves of numbers or
of points, nested or not) are averaged element by element.
"""

from __future__ import annotations

import statistics

SPREAD_SUFFIXES = ("_sd", "_min", "_max")


def block_key(block: dict) -> tuple:
    return block.get("attack"), block.get("poison_rate"), block.get("target")


def seed_groups(blocks: list[dict]) -> list[list[dict]]:
    """The blocks grouped by (attack, poison rate, target), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for block in blocks:
        groups.setdefault(block_key(block), []).append(block)
    return list(groups.values())


def aggregate_blocks(blocks: list[dict]) -> list[dict]:
    """One block per (attack, poison rate, target), in first-seen order, with `seeds` listing its seeds."""
    return [aggregate_group(group) for group in seed_groups(blocks)]


def aggregate_group(group: list[dict]) -> dict:
    """The blocks of one (attack, poison rate, target) as one block, with `seeds` listing its seeds."""
    return {**{k: v for k, v in aggregate(group).items() if k != "seed"}, "seeds": [b.get("seed") for b in group]}


def aggregate(values: list):
    """The aggregate of one field over seeds (see the module docstring)."""
    first = values[0]
    if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
        return aggregate_mapping(values)
    if all(v == first for v in values):
        return first
    if isinstance(first, list) and all(isinstance(v, list) and len(v) == len(first) for v in values):
        return [aggregate([v[i] for v in values]) for i in range(len(first))]  # a curve: point by point
    if is_number(first) and all(is_number(v) for v in values):
        return statistics.fmean(values)
    return values


def aggregate_mapping(mappings: list[dict]) -> dict:
    keys = [k for k in mappings[0] if all(k in m for m in mappings)]
    out = {}
    for key in keys:
        if key.endswith(SPREAD_SUFFIXES) and key.rsplit("_", 1)[0] in mappings[0]:
            continue  # recomputed below from the per-seed values or the pooled repeats
        values = [m[key] for m in mappings]
        if key.endswith("_repeats"):
            out[key] = [v for vs in values for v in vs]
            continue
        out[key] = aggregate(values)
        pooled = [v for m in mappings for v in m.get(f"{key}_repeats") or []]
        if is_number(out[key]) and (pooled or any(v != values[0] for v in values)):
            out.update(spread(key, pooled or values))
    return out


def spread(key: str, values: list[float]) -> dict:
    """Mean (under `key` itself), sample standard deviation, min and max of `values`."""
    return {key: statistics.fmean(values), f"{key}_sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            f"{key}_min": min(values), f"{key}_max": max(values)}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
