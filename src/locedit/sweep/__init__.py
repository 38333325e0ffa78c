"""The edit sweep over facts x layers x methods x problems: plan, run (local or Ray), store."""

from locedit.editing.layers import sweep_layers
from locedit.sweep.plan import EditTask, plan_tasks, resolved_hparams
from locedit.sweep.runner import EXECUTORS, SweepSpec, run_sweep
from locedit.sweep.store import ResultStore, results_table
from locedit.sweep.worker import EvaluationConfig, run_facts

__all__ = [
    "EXECUTORS",
    "EditTask",
    "EvaluationConfig",
    "ResultStore",
    "SweepSpec",
    "plan_tasks",
    "resolved_hparams",
    "results_table",
    "run_facts",
    "run_sweep",
    "sweep_layers",
]
