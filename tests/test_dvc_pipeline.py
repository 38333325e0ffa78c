"""`dvc repro` of a tiny config in a temporary git copy of the repository: runs, then does
nothing; `dvc metrics show` / `dvc plots show` read what dvc.yaml declares; `dvc exp run -S ...`
composes params.yaml through Hydra and reruns only the stage whose params changed."""

from __future__ import annotations

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
    assert metrics["edits"] == 4 and metrics["facts"] == 2 and metrics["failed"] == 0
    assert set(metrics["error_injection"]["ft1"]) >= {"r2_layer", "r2_trace", "r2_both", "added_r2"}
    assert set(metrics["seconds"]) == {"trace_last_run", "edit_last_run", "analyze"}
    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))
    assert "r2_layer" in json.dumps(shown)
    plots = json.loads(_dvc(repo, "plots", "show", "--json"))["data"]
    for name, y in (("rewrite_by_layer.csv", "rewrite_score"), ("trace_by_layer.csv", "effect")):
        (plot,) = plots[f"reports/plots/{name}"]
        spec = plot["content"]
        assert spec["encoding"]["color"]["field"] == "series"
        assert spec["encoding"]["y"]["field"] == y and spec["encoding"]["x"]["field"] == "layer"
        assert {"series", "layer", y} <= set(spec["data"]["values"][0])

    second = _dvc(repo, "repro")
    assert "Running stage" not in second
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "tiny run")

    # DVC composes params.yaml from conf/ itself (.dvc/config: hydra enabled)
    third = _dvc(repo, "exp", "run", "-n", "boot7",
                 "-S", "experiment=tiny", "-S", "analysis.bootstrap_samples=7")
    assert "Running stage 'analyze'" in third
    assert "Running stage 'edit'" not in third and "Running stage 'trace'" not in third
    composed = yaml.safe_load((repo / "params.yaml").read_text())
    assert composed["analysis"]["bootstrap_samples"] == 7
    assert composed["model"]["name"] == params.model.name
    table = _dvc(repo, "exp", "show", "--csv")
    header = table.splitlines()[0].split(",")
    assert "error_injection.ft1.r2_layer" in header and "error_injection.ft1.added_r2" in header
    assert any(line.startswith("boot7,") for line in table.splitlines())

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("locedit")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    assert all("locedit.code_version" in r.data.tags for r in runs)
    analysed = [r for r in runs if r.data.tags.get("analyze.dvc.exp_name") == "boot7"]
    assert analysed and "error_injection.ft1.r2_layer" in analysed[0].data.metrics
