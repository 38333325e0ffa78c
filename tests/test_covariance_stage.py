"""Stage ``stats``: which layers get statistics, and the stage end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from locedit.editing import CorpusSpec, CovarianceStore
from locedit.models import load_model
from locedit.pipeline.common import compose_params
from locedit.pipeline.stats import stats_layers
from locedit.testing import save_tiny, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_stats_layers_cover_rome_layers_memit_windows_and_tuning():
    model = tiny_model("gpt2", n_layers=8)
    params = compose_params(ROOT / "conf", ["edit.layers=[1,6]", "edit.methods=[rome,memit,ft1]"])
    assert stats_layers(params, model) == [0, 1, 2, 3, 4, 5, 6, 7]
    params = compose_params(ROOT / "conf", ["edit.layers=[1,6]", "edit.methods=[rome,ft5]"])
    assert stats_layers(params, model) == [1, 6]
    params = compose_params(
        ROOT / "conf", ["edit.layers=[6]", "edit.methods=[rome]", "tune.enabled=true"]
    )
    assert stats_layers(params, model) == [2, 6]  # tune.layer null: the default layer
    params = compose_params(ROOT / "conf", ["edit.methods=[ft1,ft5]"])
    assert stats_layers(params, model) == []
    # The grid when edit.layers is null: 5 evenly spaced layers of 8 plus the default layer 2.
    params = compose_params(ROOT / "conf", ["edit.methods=[rome]", "edit.n_grid_layers=5"])
    assert stats_layers(params, model) == [0, 2, 4, 5, 7]


def test_stage_writes_statistics_templates_and_manifest(tmp_path, monkeypatch):
    from locedit.pipeline import stats as stage

    monkeypatch.chdir(ROOT)
    model_dir = save_tiny(tmp_path / "tiny", "gpt2", n_layers=4)
    params = compose_params(
        "conf",
        [
            f"model.name={model_dir}",
            f"paths.outputs={tmp_path / 'outputs'}", f"paths.reports={tmp_path / 'reports'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
            "edit.layers=[1]",
            "edit.methods=[rome,memit]",
            "stats.n_samples=8",
            "stats.sample_length=16",
        ],
    )
    stage.run(params)
    out = tmp_path / "outputs" / "stats"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] == [0, 1, 2, 3]
    assert len(manifest["files"]) == 4 and all((out / f).exists() for f in manifest["files"])
    assert len(manifest["context_templates"]["rome"]) == 21
    assert len(manifest["context_templates"]["memit"]) == 6
    # The edit stage's store finds the same files without recomputing.
    model, tokenizer = load_model(str(model_dir))
    store = CovarianceStore(
        out, CorpusSpec.from_params(params.stats), tokenizer, compute_missing=False
    )
    assert store.fingerprint(model) == manifest["model_fingerprint"]
    assert store.get(model, 2).shape == (256, 256)

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=[str(params.mlflow.experiment)], output_format="list"
    )
    (run,) = [r for r in runs if r.data.tags["locedit.stage"] == "stats"]
    assert run.data.metrics["stats_layers"] == 4
