"""Defense registry: one file per purification defense (ALGORITHMS §4)."""

from ._common import DEFENSES, PROFILES, DefenderData, Defense, create_defense, defense_params, run_defense, summary, \
    trace_defense
from ._trajectory import trajectory_fractions
from . import anp, bti_dbf, ep, fst, ft, ft_sam, i_bau, pam  # noqa: F401,E402  (registration)

__all__ = ["DEFENSES", "PROFILES", "DefenderData", "Defense", "create_defense", "defense_params", "run_defense",
           "summary", "trace_defense", "trajectory_fractions"]
