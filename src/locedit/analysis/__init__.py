"""Does the tracing effect at a layer predict edit success there? (paper §4-5, App. B-C)

``analyze(effects, results, AnalysisConfig)`` fits every regression; ``write_report`` turns the
result into the paper's tables, figures and a plain-words summary.
"""

from locedit.analysis.bootstrap import bootstrap_r2, resample_facts
from locedit.analysis.config import AnalysisConfig, TraceSpec
from locedit.analysis.data import (
    JoinReport,
    SchemaError,
    concentrated_facts,
    join_trace,
    read_effects,
    read_results,
    trace_table,
)
from locedit.analysis.regression import (
    FORMULAS,
    MixedResult,
    RegressionResult,
    fit_regressions,
    layer_correlations,
    mixed_effects,
    pearson,
)
from locedit.analysis.report import mlflow_metrics, write_report
from locedit.analysis.study import Analysis, Variant, analyze

__all__ = [
    "FORMULAS",
    "Analysis",
    "AnalysisConfig",
    "JoinReport",
    "MixedResult",
    "RegressionResult",
    "SchemaError",
    "TraceSpec",
    "Variant",
    "analyze",
    "bootstrap_r2",
    "concentrated_facts",
    "fit_regressions",
    "join_trace",
    "layer_correlations",
    "mixed_effects",
    "mlflow_metrics",
    "pearson",
    "read_effects",
    "read_results",
    "resample_facts",
    "trace_table",
    "write_report",
]
