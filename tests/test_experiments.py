"""Every experiment config runs end to end on a tiny random model, so none of them rots."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from e2e_support import ROOT, run_all, tiny_overrides, tiny_params, write_data_root

from locedit.pipeline.common import compose_params
from locedit.testing import save_tiny

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
    # No edit fails; a problem that does not apply to a fact is skipped with its reason.
    failed = results[results.status == "failed"]
    assert failed.empty, failed[["fact_id", "method", "problem", "layer", "reason"]].to_string()
    skipped = results[results.status == "skipped"]
    assert skipped["reason"].str.len().gt(0).all()
    ok = results[results.status == "ok"]
    assert set(ok.method) == set(params.edit.methods)
    assert ok["rewrite_score"].notna().all()
    # The analysis fitted the regressions of the main result and wrote them into the summary.
    summary = (Path(params.paths.reports) / "summary.md").read_text()
    assert "No rewrite-score regressions were fitted" not in summary
    # R² is a number, or the summary says why not (a tiny model's scores can be constant)
    added = re.search(r"raises R² by (\S+?) \(", summary)
    assert added, summary
    assert added[1] != "n/a" or re.search(r"Caveats: [^.]*R² undefined", summary), summary
    assert re.search(r"correlate at Pearson r = -?\d\.\d\d", summary), summary


def test_a_multimodal_wrapper_runs_the_default_pipeline(tmp_path):
    """Gemma-3 4B and larger load as Gemma3ForConditionalGeneration: every stage on a tiny one
    (its language model traced, its statistics gathered and edited through its text config),
    no edit failing."""
    model_dir = save_tiny(tmp_path / "tiny-gemma3", "gemma3", n_layers=4)
    overrides = tiny_overrides(tmp_path, model_dir, write_data_root(tmp_path / "data"))
    params = compose_params(
        ROOT / "conf", ["experiment=default", *overrides, "edit.methods=[rome,memit,ft1]"]
    )
    run_all(params)
    results = pd.read_parquet(Path(params.paths.outputs) / "edit" / "results.parquet")
    assert len(results) == 2 * 2 * 3 * len(params.edit.problems)
    failed = results[results.status == "failed"]
    assert failed.empty, failed[["fact_id", "method", "layer", "reason"]].to_string()
    assert (results.status == "ok").any()
