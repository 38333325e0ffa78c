"""`dvc repro` of a tiny config in a temporary copy of the repository: runs, then does nothing,
then reruns only the stage whose params changed."""

from __future__ import annotations

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


def _dvc(repo: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env,
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_dvc_repro_tiny_pipeline(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("conf", "src"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    model_dir = save_tiny(tmp_path / "tiny-model", "gpt2", n_layers=4)
    data_root = write_data_root(tmp_path / "data")
    overrides = [
        o for o in tiny_overrides(tmp_path, model_dir, data_root)
        if not o.startswith(("paths.", "mlflow."))
    ] + ["edit.methods=[ft1]"]
    params = compose_params(repo / "conf", overrides)
    (repo / "params.yaml").write_text(OmegaConf.to_yaml(params))
    _dvc(repo, "init", "--no-scm", "-q")

    first = _dvc(repo, "repro")
    for stage in ("prepare", "filter", "stats", "trace", "tune", "edit", "analyze"):
        assert f"Running stage '{stage}'" in first, stage
    assert (repo / "reports" / "summary.md").exists()
    assert (repo / "mlruns" / "mlflow.db").exists()

    second = _dvc(repo, "repro")
    assert "Running stage" not in second

    changed = yaml.safe_load((repo / "params.yaml").read_text())
    changed["analysis"]["bootstrap_samples"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(changed))
    third = _dvc(repo, "repro")
    assert "Running stage 'analyze'" in third
    assert "Running stage 'edit'" not in third and "Running stage 'trace'" not in third
