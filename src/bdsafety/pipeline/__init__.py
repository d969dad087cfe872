"""The pipeline layer: specs and plans (`specs`), the shared setup of a run (`setup`), the stages that
compute (`stages`) and the orchestration of a whole experiment (`run`)."""

from .run import run_experiment
from .setup import Setup, evaluate_setup, prepare
from .specs import CLEAN, AttackSpec, DataSpec, ExperimentSpec, Plan, build_plan, load_plan, load_spec

__all__ = ["CLEAN", "AttackSpec", "DataSpec", "ExperimentSpec", "Plan", "Setup", "build_plan", "evaluate_setup",
           "load_plan", "load_spec", "prepare", "run_experiment"]
