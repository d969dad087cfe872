"""Defense registry: one file per purification defense (docs/methods/defenses.md)."""

from ._common import DEFENSES, DefenderData, Defense, DefenseBase, summary, trace_defense
from ._trajectory import trajectory_fractions
from . import anp, bti_dbf, clp, ep, fp, fst, ft, ft_sam, i_bau, mcr, nad, pam, sau, tsc  # noqa: F401,E402  (registration)

__all__ = ["DEFENSES", "DefenderData", "Defense", "DefenseBase", "summary", "trace_defense", "trajectory_fractions"]
