"""Trigger sources: where an audit's poisons come from (attacks, BackdoorBench records, folders, trigger files)."""

from ._common import IMPLANTED_ASR, UNKNOWN_TRIGGER, AttackerPoisons, TriggerSource
from .folders import PoisonFolders
from .record import RecordSource as BackdoorBenchPoisons
from .trigger_file import TriggerFile

__all__ = ["IMPLANTED_ASR", "UNKNOWN_TRIGGER", "AttackerPoisons", "BackdoorBenchPoisons", "TriggerSource",
           "PoisonFolders", "TriggerFile"]
