"""``locedit edit`` (``python -m locedit.editing``): all four methods through one interface."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from locedit.editing.cli import main
from locedit.pipeline.common import compose_params
from locedit.testing import editable_tiny_model, gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The Eiffel Tower is located in"


def test_cli_edits_with_every_method_and_prints_probabilities(tmp_path, capsys):
    # larger random weights than the default tiny model, so an edit visibly moves p(target)
    model_dir = tmp_path / "tiny"
    editable_tiny_model("gpt2", n_layers=4).save_pretrained(model_dir)
    gpt2_tokenizer().save_pretrained(model_dir)
    params = compose_params(
        ROOT / "conf",
        [
            f"model.name={model_dir}",
            f"paths.outputs={tmp_path / 'outputs'}", f"paths.reports={tmp_path / 'reports'}",
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
    argv = ["--prompt", PROMPT, "--subject", "Eiffel Tower"]
    argv += ["--target", "Rome", "--compare", "Paris", "--layer", "1", "--params", str(params_file)]
    # the help text's own example: a typed override (it used to stay the string "0.9")
    argv += ["--set", "method.rome.kl_factor=0.9", "--set", "method.ft.steps=4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    number = r"(\d[\d.e+-]*)"
    rome_true, paris_true = _probabilities(model_dir, ["Rome", "Paris"])
    unedited = re.search(rf"unedited: p\('Rome'\) = {number}, p\('Paris'\) = {number}", out)
    assert float(unedited[1]) == pytest.approx(rome_true, rel=1e-3)
    assert float(unedited[2]) == pytest.approx(paris_true, rel=1e-3)
    for method, layers in (
        ("rome", "[1]"),
        ("memit", "[0, 1, 2, 3]"),
        ("ft1", "[1]"),
        ("ft5", "[0, 1, 2, 3]"),
    ):
        line = next(line for line in out.splitlines() if line.strip().startswith(method))
        assert f"layers {layers}" in line
        found = re.search(rf"p\('Rome'\) = {number}, p\('Paris'\) = {number}", line)
        # every method raised p(target) (the request maximises it)
        assert float(found[1]) > float(unedited[1]), line


def _probabilities(model_dir, objects):
    from locedit.models import load_model
    from locedit.models.scoring import target_log_probs
    from locedit.models.tokens import encode_prompt, encode_target

    model, tok = load_model(str(model_dir))
    ids = encode_prompt(tok, PROMPT, "Eiffel Tower").input_ids
    targets = [encode_target(tok, PROMPT, o) for o in objects]
    return target_log_probs(model, [ids] * len(targets), targets).exp().tolist()
