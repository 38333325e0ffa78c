"""``locedit edit`` (``python -m locedit.editing``): all four methods through one interface."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from locedit.editing.cli import main
from locedit.pipeline.common import compose_params
from locedit.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]


def test_cli_edits_with_every_method_and_prints_probabilities(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "tiny", "gpt2", n_layers=4)
    params = compose_params(
        ROOT / "conf",
        [
            f"model.name={model_dir}",
            f"paths.outputs={tmp_path / 'outputs'}",
            "stats.n_samples=8",
            "stats.sample_length=16",
            "method.rome.context_template_lengths=[4]",
            "method.rome.n_context_templates=1",
            "method.rome.v_steps=3",
            "method.memit.n_context_templates=1",
            "method.memit.v_steps=3",
            "method.ft.steps=3",
        ],
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(OmegaConf.to_yaml(params))
    argv = ["--prompt", "The Eiffel Tower is located in", "--subject", "Eiffel Tower"]
    argv += ["--target", "Rome", "--compare", "Paris", "--layer", "1", "--params", str(params_file)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "unedited: p('Rome') = " in out
    for method, layers in (
        ("rome", "[1]"),
        ("memit", "[0, 1, 2, 3]"),
        ("ft1", "[1]"),
        ("ft5", "[0, 1, 2, 3]"),
    ):
        line = next(line for line in out.splitlines() if line.strip().startswith(method))
        assert f"layers {layers}" in line
        assert re.search(r"p\('Rome'\) = \d\.\d{4}, p\('Paris'\) = \d\.\d{4}", line)
