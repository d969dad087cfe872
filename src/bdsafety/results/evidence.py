"""One line of a verdict card's evidence, and the scale of what an attacker needs, weakest first.

Each audit reports its own lines (`card_evidence` in its file) and says where each sits on this scale
(`card_ranks`), so the card orders them without knowing any audit by name. A leaf module: the audits import
it, it imports nothing of theirs.
"""

from __future__ import annotations

from .thresholds import NOT_PURIFIED_ASR, REVIVAL_GAP

# What the attacker needs for a line to revive the model, weakest first (a card names the weakest that did).
CLEAN_DATA_ONLY = 0  # retuning on clean data, no poison
ANOTHER_MODELS_PERTURBATION = 1  # a perturbation found on another model: no access to this one
QUERIES_ONLY = 2  # queries to this model
THIS_MODELS_WEIGHTS = 3  # a perturbation optimised with this model's weights
SMALLEST_POISON_BUDGET = 4  # poisons and fine-tuning, at the smallest budget that revives
PAPER_POISON_BUDGET = 5  # poisons and fine-tuning at the paper's RA budget


def revived(value: float, clean: float | None) -> bool:
    """More than REVIVAL_GAP above the clean model's ASR under the same audit; without a clean reference, at
    least NOT_PURIFIED_ASR."""
    return value - clean > REVIVAL_GAP if clean is not None else value >= NOT_PURIFIED_ASR


def line(audit: str, what: str, value: float, clean: float | None, budget: str, spread: float | None = None) -> dict:
    return {"audit": audit, "what": what, "value": value, "sd": spread, "clean_model": clean,
            "revived": revived(value, clean), "budget": budget}
