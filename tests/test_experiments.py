"""Every experiment config runs end to end on a tiny random model, so none of them rots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from e2e_support import ROOT, run_all, tiny_params

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def test_all_configs_are_covered():
    assert {"default", "paper", "gpt2-xl", "gpt-j", "zsre", "smollm2", "gpu"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_end_to_end(experiment, tmp_path):
    # The default runs all four methods; the others keep their problems, tuning and data but
    # edit with ROME and FT-1 only (MEMIT and FT-5 have their own tests), to fit CI's budget.
    extra = [] if experiment == "default" else ["edit.methods=[rome,ft1]"]
    params = tiny_params(tmp_path, experiment, extra)
    run_all(params)
    results = pd.read_parquet(Path(params.paths.outputs) / "edit" / "results.parquet")
    expected = 2 * 2 * len(params.edit.methods) * len(params.edit.problems)
    assert len(results) == expected
    assert (results.status != "failed").any()
    assert set(results.method) == set(params.edit.methods)
    summary = (Path(params.paths.reports) / "summary.md").read_text()
    assert "R²" in summary or "R^2" in summary
