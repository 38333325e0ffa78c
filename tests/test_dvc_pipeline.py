"""`dvc repro` of a tiny config in a temporary git copy of the repository: runs, then does
nothing; `dvc metrics show` / `dvc plots show` read what dvc.yaml declares; `dvc exp run -S ...`
composes params.yaml through Hydra and reruns only the stage whose params changed; the committed
dvc.lock is the baseline `dvc exp show` / `dvc metrics diff` compare with; every pipeline run is
its own MLflow run tree (issue 27)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from e2e_support import ROOT, tiny_overrides, write_data_root
from omegaconf import OmegaConf

from locedit.pipeline.common import compose_params
from locedit.testing import save_tiny

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
}


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **GIT_ENV)


def _dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=_env(),
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, env=_env(), check=True, capture_output=True)


def _tiny_experiment(repo: Path, tmp_path: Path) -> None:
    """conf/experiment/tiny.yaml: the tiny overrides as an experiment DVC's Hydra can compose."""
    model_dir = save_tiny(tmp_path / "tiny-model", "gpt2", n_layers=4)
    data_root = write_data_root(tmp_path / "data")
    overrides = [
        o for o in tiny_overrides(tmp_path, model_dir, data_root)
        if not o.startswith(("paths.", "mlflow."))
    ] + [
        "edit.methods=[ft1]", "experiment_name=tiny",
        # 3 facts at 2 layers: 6 rows for the 4 parameters of layer x trace, so the fit is not
        # saturated and has bootstrap intervals (a saturated one has none)
        "data.max_facts=3",
        # a radius and step that move the tiny model's p(o_false), so the R² are defined
        "problem.overrides.error_injection.ft1.linf_eps=1.0", "method.ft.lr=0.5",
    ]
    body = OmegaConf.to_yaml(OmegaConf.from_dotlist(overrides))
    (repo / "conf" / "experiment" / "tiny.yaml").write_text("# @package _global_\n" + body)


def test_dvc_repro_metrics_plots_and_hydra_exp_run(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("conf", "src", ".dvc"):
        shutil.copytree(
            ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache")
        )
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, repo / name)
    _tiny_experiment(repo, tmp_path)
    params = compose_params(repo / "conf", ["experiment=tiny"])
    (repo / "params.yaml").write_text(OmegaConf.to_yaml(params))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "tiny")

    first = _dvc(repo, "repro")
    for stage in ("prepare", "filter", "stats", "trace", "tune", "edit", "analyze"):
        assert f"Running stage '{stage}'" in first, stage
    assert (repo / "reports" / "summary.md").exists()
    assert (repo / "mlruns" / "mlflow.db").exists()

    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["edits"] == 6 and metrics["facts"] == 3 and metrics["failed"] == 0
    assert set(metrics["error_injection"]["ft1"]) >= {"r2_layer", "r2_trace", "r2_both", "added_r2"}
    assert set(metrics) == {"edits", "facts", "failed", "error_injection"}  # the headline only
    detail = json.loads(_dvc(repo, "metrics", "show", "--json", "reports/metrics_detail.json"))
    assert "random_baseline" in json.dumps(detail) and '"seconds"' in json.dumps(detail)
    seconds = json.loads((repo / "reports" / "metrics_detail.json").read_text())["seconds"]
    # every stage's wall time (costs.json, locedit run), and trace's and edit's own work
    assert set(seconds) == {"prepare", "filter", "stats", "trace", "tune", "edit", "analyze",
                            "trace_last_run", "edit_last_run"}
    assert all(value >= 0 for value in seconds.values())
    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))
    assert "r2_layer" in json.dumps(shown) and "random_baseline" not in json.dumps(shown)
    plots = json.loads(_dvc(repo, "plots", "show", "--json"))["data"]
    for name, y in (("rewrite_by_layer.csv", "rewrite_score"), ("trace_by_layer.csv", "effect")):
        (plot,) = plots[f"reports/plots/{name}"]
        spec = plot["content"]
        assert spec["encoding"]["color"]["field"] == "series"
        assert spec["encoding"]["y"]["field"] == y and spec["encoding"]["x"]["field"] == "layer"
        assert {"series", "layer", y} <= set(spec["data"]["values"][0])

    second = _dvc(repo, "repro")
    assert "Running stage" not in second
    # the README's baseline: commit dvc.lock after the run
    _git(repo, "add", "dvc.lock")
    _git(repo, "commit", "-q", "-m", "baseline run")

    # DVC composes params.yaml from conf/ itself (.dvc/config: hydra enabled)
    third = _dvc(repo, "exp", "run", "-n", "boot7",
                 "-S", "experiment=tiny", "-S", "analysis.bootstrap_samples=7")
    assert "Running stage 'analyze'" in third
    assert "Running stage 'edit'" not in third and "Running stage 'trace'" not in third
    composed = yaml.safe_load((repo / "params.yaml").read_text())
    assert composed["analysis"]["bootstrap_samples"] == 7
    assert composed["model"]["name"] == params.model.name
    fourth = _dvc(repo, "exp", "run", "-n", "boot9",
                  "-S", "experiment=tiny", "-S", "analysis.bootstrap_samples=9")
    assert "Running stage 'analyze'" in fourth

    rows = list(csv.DictReader(io.StringIO(_dvc(repo, "exp", "show", "--csv"))))
    assert not any(name.startswith("random_baseline") for name in rows[0])
    by_name = {row["Experiment"]: row for row in rows}
    assert {"boot7", "boot9"} <= set(by_name)
    (baseline,) = [r for r in rows if r["typ"] == "baseline" and r["rev"] != "workspace"]
    for row in (baseline, by_name["boot7"], by_name["boot9"]):
        assert row["error_injection.ft1.r2_layer"] not in ("", "!")
        assert row["error_injection.ft1.added_r2_lo"] not in ("", "!")
    diff = json.loads(_dvc(repo, "metrics", "diff", "HEAD", "boot7", "--json", "--all"))
    assert "error_injection.ft1.added_r2_lo" in diff["reports/metrics.json"]
    plots_diff = json.loads(_dvc(repo, "plots", "diff", "HEAD", "boot7", "--json"))["data"]
    (curves,) = plots_diff["reports/plots/rewrite_by_layer.csv"]
    assert curves["revisions"] == ["HEAD", "boot7"]

    _check_run_trees(repo)


def _check_run_trees(repo: Path) -> None:
    """`dvc repro` and each `dvc exp run` made its own parent run: nested runs for the stages
    that ran, tags linking the skipped ones to the runs that produced their outputs, and the
    headline metrics on the parent."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("locedit")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert all("locedit.code_version" in r.data.tags for r in runs)
    parents = [r for r in runs if r.data.tags["locedit.stage"] == "pipeline"]
    assert len(parents) == 3  # repro, boot7, boot9 (the second `dvc repro` ran nothing)
    children = {
        p.info.run_id: {
            r.data.tags["locedit.stage"]: r
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == p.info.run_id
        }
        for p in parents
    }
    (repro,) = [p for p in parents if "dvc.exp_name" not in p.data.tags]
    assert set(children[repro.info.run_id]) == {
        "prepare", "filter", "stats", "trace", "tune", "edit", "analyze"
    }
    repro_edit = children[repro.info.run_id]["edit"]
    sweep = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == repro_edit.info.run_id]
    assert [r.info.run_name for r in sweep] == ["ft1/error_injection"]
    assert sweep[0].data.metrics["edits_ok"] == 6
    assert repro_edit.info.start_time <= sweep[0].info.start_time <= sweep[0].info.end_time
    assert sweep[0].info.end_time <= repro_edit.info.end_time
    for name in ("boot7", "boot9"):
        (parent,) = [p for p in parents if p.data.tags.get("dvc.exp_name") == name]
        tags, metrics = parent.data.tags, parent.data.metrics
        assert tags["dvc.exp_baseline_rev"] and tags["mlflow.source.git.commit"]
        assert set(children[parent.info.run_id]) == {"analyze"}
        assert tags["locedit.stages_ran"] == "analyze"
        assert tags["locedit.reused.edit"] == repro_edit.info.run_id
        assert tags["locedit.reused.trace"] == children[repro.info.run_id]["trace"].info.run_id
        analyze = children[parent.info.run_id]["analyze"]
        assert analyze.data.params["analysis.bootstrap_samples"] == name[-1]
        assert metrics["edits"] == 6 and "error_injection.ft1.r2_layer" in metrics
        assert metrics["error_injection.ft1.r2_layer"] == analyze.data.metrics[
            "error_injection.ft1.r2_layer"
        ]
        assert len(metrics) <= 12  # the headline only: the runs table stays readable
        assert parent.info.start_time <= analyze.info.start_time
        assert analyze.info.end_time <= parent.info.end_time
