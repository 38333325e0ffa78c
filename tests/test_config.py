"""params.yaml is the composition of conf/, and the CLI lists its subcommands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

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
