"""The rows and blocks of results.json, typed: the one place that names their keys.

A block is one (attack, seed) of a run; a row one purified model of it. Each method adds its own fields to its
row (a defense's `row_fields`, an audit's `row_fields` and `strength_fields`), so the keys below are the ones
every row and block has; `to_json` gives the order results.json has always had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Row:
    """One purified model: its own metrics (`o_*` in results.json), how far its defense moved, what its defense
    and audits report, and its verdict card (absent when no audit ran on it)."""

    defense: str
    purified: dict[str, Any]
    strength: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)
    card: dict | None = None

    def to_json(self) -> dict:
        return {"defense": self.defense, **{f"o_{k}": v for k, v in self.purified.items()},
                "strength": self.strength, **self.fields, **({"card": self.card} if self.card is not None else {})}


@dataclass(frozen=True)
class Block:
    """One (attack, seed): the backdoored and clean models' metrics, one row per purified model, and the
    cell-scope audits' metrics (under their names)."""

    attack: str
    poison_rate: float
    target: int | None
    seed: int
    backdoored: dict[str, Any]
    clean: dict[str, Any]
    rows: tuple[Row, ...]
    trigger: dict | None = None  # a fitted attack's trigger statistics (PSNR, bit accuracy, ...)
    across: dict[str, dict] = field(default_factory=dict)
    implanted: bool = True  # False: the backdoored model does not follow its poisons; no audit ran

    def to_json(self) -> dict:
        return {"attack": self.attack, "poison_rate": self.poison_rate, "target": self.target, "seed": self.seed,
                **({"trigger": self.trigger} if self.trigger else {}), "backdoored": self.backdoored,
                "clean": self.clean, **({} if self.implanted else {"backdoor_implanted": False}),
                "rows": [row.to_json() for row in self.rows], **self.across}


@dataclass(frozen=True)
class Results:
    """results.json: the run's identity, the first block's numbers at the top level (as one-attack readers
    expect), every block under `attacks`, and with several seeds the `summary` over them."""

    dataset: str
    model: str
    seed: int
    profile: str
    spec_hash: str
    blocks: tuple[Block, ...]
    seeds: tuple[int, ...] = ()  # the spec's `seeds`, when it has them
    summary: list[dict] | None = None
    note: str = ""  # the spec's note for readers of its tables, when it has one

    def to_json(self) -> dict:
        blocks = [block.to_json() for block in self.blocks]
        return {"dataset": self.dataset, "model": self.model, "seed": self.seed, "profile": self.profile,
                **({"seeds": list(self.seeds)} if self.seeds else {}), "spec_hash": self.spec_hash,
                **({"note": self.note} if self.note else {}),
                **{k: blocks[0][k] for k in ("backdoored", "clean", "rows")}, "attacks": blocks,
                **({"summary": self.summary} if self.summary is not None else {})}
