"""The paper's names and orderings for methods, problems and metrics in tables and figures."""

from __future__ import annotations

#: The paper's four methods in its order, then the later closed-form editors (issue 21).
METHOD_ORDER = ("ft1", "ft5", "rome", "memit", "emmet", "alphaedit")
METHOD_LABELS = {
    "ft1": "FT (1 layer)",
    "ft5": "FT (5 layers)",
    "rome": "ROME (1 layer)",
    "memit": "MEMIT (5 layers)",
    "emmet": "EMMET (5 layers)",
    "alphaedit": "AlphaEdit (5 layers)",
}
PROBLEM_ORDER = (
    "error_injection",
    "tracing_reversal",
    "fact_erasure",
    "fact_amplification",
    "fact_forcing",
)
PROBLEM_LABELS = {
    "error_injection": "Error Injection",
    "tracing_reversal": "Tracing Reversal",
    "fact_erasure": "Fact Erasure",
    "fact_amplification": "Fact Amplification",
    "fact_forcing": "Fact Forcing",
}
METRIC_LABELS = {
    "rewrite_score": "Rewrite Score",
    "paraphrase_score": "Paraphrase Score",
    "neighborhood_score": "Neighborhood Score",
    "essence_score": "Essence Score",
    "overall_score": "Overall Score",
    "overall_score_with_essence": "Overall Score (with Essence)",
    "rome_rewrite_prob_diff": "Rewrite magnitude p*(o_false) - p*(o_true)",
    "neighborhood_kl": "Neighborhood KL",
}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def problem_label(problem: str) -> str:
    return PROBLEM_LABELS.get(problem, problem.replace("_", " ").title())


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " ").title())


def _rank(order: tuple[str, ...], value: str) -> tuple[int, str]:
    return (order.index(value), "") if value in order else (len(order), value)


def method_rank(method: str) -> tuple[int, str]:
    return _rank(METHOD_ORDER, method)


def problem_rank(problem: str) -> tuple[int, str]:
    return _rank(PROBLEM_ORDER, problem)


def sort_methods(methods) -> list[str]:
    return sorted(set(methods), key=method_rank)


def sort_problems(problems) -> list[str]:
    return sorted(set(problems), key=problem_rank)
