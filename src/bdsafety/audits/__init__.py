"""Superficial-safety audits (docs/methods/audits.md): measurements on the test set, never defenses.

One file per audit; the contract, `AuditData` and `AuditResult` are in `_common.py`. Build one with
`AUDITS.create(name, profile, shared, **params)`, or a spec's set with `create_audits`.
"""

from ._common import AUDITS, Audit, AuditBase, AuditData, AuditedModel, AuditResult, create_audits, \
    missing_dependencies, run_order, single_shot, single_shot_checks, with_dependencies
from . import budget, connectivity, existence, position, reactivation, retuning  # noqa: F401
from . import trajectory, transfer, universal  # noqa: F401
from .connectivity import LinearModeConnectivity, interpolate_state
from .reactivation import QueryReactivation
from .retuning import Retuning
from .trajectory import DefenseTrajectory

__all__ = ["AUDITS", "Audit", "AuditBase", "AuditData", "AuditedModel", "AuditResult",
           "DefenseTrajectory", "LinearModeConnectivity",
           "QueryReactivation", "Retuning", "create_audits", "interpolate_state", "missing_dependencies", "run_order",
           "single_shot", "single_shot_checks", "with_dependencies"]
