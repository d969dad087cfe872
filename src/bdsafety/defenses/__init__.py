"""Defense registry: one file per purification defense (ALGORITHMS §4)."""

from ._common import DEFENSES, PROFILES, DefenderData, Defense, create_defense, defense_params, run_defense, summary

__all__ = ["DEFENSES", "PROFILES", "DefenderData", "Defense", "create_defense", "defense_params", "run_defense",
           "summary"]
