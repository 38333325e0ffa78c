"""Every override takes effect or is refused in one line, before any model loads and before a
stage clears its previous outputs (issue 27.7)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from locedit.cli import main
from locedit.editing.cli import main as edit_main
from locedit.editing.hparams import FTHParams, RomeHParams, field_problems
from locedit.editing.methods import get_method
from locedit.params import apply_overrides, compose_params
from locedit.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]
EDIT = ["edit", "--prompt", "The Eiffel Tower is in", "--subject", "Eiffel Tower", "--target", "Rome"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "gpt2", "gpt2", n_layers=4)


@pytest.fixture
def project(tmp_path, model_dir, monkeypatch) -> Path:
    """A params.yaml on the tiny model, previous outputs of edit and trace, and model loading
    that fails the test: every case below must be refused before weights load."""
    params = compose_params(
        ROOT / "conf", [f"model.name={model_dir}", f"paths.outputs={tmp_path / 'outputs'}",
         f"paths.reports={tmp_path / 'reports'}"]
    )
    (tmp_path / "params.yaml").write_text(OmegaConf.to_yaml(params))
    for stage, name in (("edit", "results.parquet"), ("trace", "effects.parquet")):
        (tmp_path / "outputs" / stage).mkdir(parents=True)
        (tmp_path / "outputs" / stage / name).write_text("previous run")

    def loaded(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the run was refused")

    monkeypatch.setattr("locedit.params._cached_model", loaded)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _refused(argv: list[str], caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="locedit"):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    return errors[0]


def _untouched(root: Path) -> None:
    assert (root / "outputs" / "edit" / "results.parquet").read_text() == "previous run"
    assert (root / "outputs" / "trace" / "effects.parquet").read_text() == "previous run"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method.rome.v_lr=abc", "method.rome.v_lr='abc' (must be a number)"),
        ("method.rome.v_lr=.inf", "method.rome.v_lr='.inf' (must be a number)"),
        ("method.rome.v_lr=inf", "method.rome.v_lr=inf (must be a finite number)"),
        ("method.ft1.linf_eps=-1", "method.ft1.linf_eps=-1.0 (must be positive)"),
        ("method.memit.v_steps=0", "method.memit.v_steps=0"),
        ("method.rome.key_policy=both", "method.rome.key_policy='both' (must be one of"),
        ("method.rome.mom2_adjustment=1", "method.rome.mom2_adjustment=1 (must be true or false)"),
        ("method.rome.no_such_key=3", "['method.rome.no_such_key']"),
    ],
)
def test_edit_command_refuses_bad_hyperparameters_naming_the_key(project, caplog, override, expected):
    assert expected in _refused([*EDIT, "--method", "rome", "--set", override], caplog)


def test_edit_command_refuses_a_layer_beyond_the_model_from_its_config(project, caplog):
    assert "--layer 4 out of range: the model has layers 0..3" in _refused([*EDIT, "--layer", "4"], caplog)
    # the same as `python -m locedit.editing`: one line, no traceback
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert edit_main([*EDIT[1:], "--layer", "-1"]) == 2
    assert "--layer -1 out of range" in caplog.text
    # problem overrides never reach `locedit edit` (it edits without a problem)
    line = _refused([*EDIT, "--set", "problem.overrides.error_injection.rome.kl_factor=0.5"], caplog)
    assert "problem.overrides.error_injection.rome.kl_factor has no effect" in line


@pytest.mark.parametrize(
    ("stage", "override", "expected"),
    [
        ("edit", "method.rome.no_such_key=3", "['method.rome.no_such_key']"),
        ("edit", "method.rome.v_lr=abc", "method.rome.v_lr='abc'"),
        # shadowed by the more specific problem override: it would silently change nothing
        ("edit", "method.ft1.linf_eps=2e-4", "problem.overrides.error_injection.ft1.linf_eps wins for ft1/error_injection"),
        ("edit", "method.rome.kl_factor=0.5", "problem.overrides.error_injection.rome.kl_factor wins"),
        ("edit", "edit.layers=[1,4]", "edit.layers [4] out of range: the model has layers 0..3"),
        ("trace", "trace.windows=[0]", "trace.windows must be positive integers, got [0]"),
        ("trace", "trace.windows=[abc]", "trace.windows must be positive integers, got ['abc']"),
        ("trace", "trace.windos=[3]", "unknown key(s) trace.windos"),
    ],
)
def test_a_refused_stage_leaves_the_previous_outputs_as_they_were(project, caplog, stage, override, expected):
    assert expected in _refused(["run", stage, "--set", override], caplog)
    _untouched(project)


def test_partly_shadowed_override_is_reported_with_the_winning_key(caplog):
    params = compose_params(ROOT / "conf", ["edit.problems=[error_injection,tracing_reversal]"])
    with caplog.at_level(logging.WARNING, logger="locedit"):
        apply_overrides(params, ["method.rome.kl_factor=0.5"])
    assert (
        "method.rome.kl_factor is shadowed where problem.overrides.error_injection.rome.kl_factor "
        "wins for rome/error_injection"
    ) in caplog.text
    assert get_method("rome").hparams_from(params, "tracing_reversal").kl_factor == 0.5
    # where nothing shadows it, the value takes effect
    caplog.clear()
    apply_overrides(params, ["method.rome.v_lr=0.3", "method.memit={v_lr: 0.2}"])
    assert "shadowed" not in caplog.text
    assert get_method("rome").hparams_from(params, "error_injection").v_lr == 0.3
    assert get_method("memit").hparams_from(params, "tracing_reversal").v_lr == 0.2


def test_a_model_default_shadows_the_method_section():
    params = compose_params(ROOT / "conf", ["model=gemma-3-270m"])
    with pytest.raises(ValueError, match=(
        r"method.memit.v_lr_relative has no effect: "
        r"method.per_model.gemma-3-270m.memit.v_lr_relative wins for memit/error_injection"
    )):
        apply_overrides(params, ["method.memit.v_lr_relative=0.05"])
    apply_overrides(params, ["method.per_model.gemma-3-270m.memit.v_lr_relative=0.05"])
    assert get_method("memit").hparams_from(params, "error_injection").v_lr_relative == 0.05


def test_hparams_sources_name_the_key_that_wins():
    params = compose_params(ROOT / "conf", ["model=gemma-3-270m"])
    sources = get_method("ft1").config_sources(params, "error_injection", {"lr": 1e-3})
    assert [prefix for prefix, _ in sources] == [
        "", "method.ft", "method.ft1", "method.per_model.gemma-3-270m.ft",
        "method.per_model.gemma-3-270m.ft1", "problem.overrides.error_injection.ft1", "overrides",
    ]
    with pytest.raises(ValueError, match=r"problem.overrides.error_injection.ft1.linf_eps=0.0 \(must be positive\)"):
        get_method("ft1").hparams_from(
            OmegaConf.merge(params, {"problem": {"overrides": {"error_injection": {"ft1": {"linf_eps": 0}}}}}),
            "error_injection",
        )


def test_field_checks_follow_the_dataclass_types_and_ranges():
    assert field_problems(RomeHParams, RomeHParams().to_dict()) == []
    assert field_problems(FTHParams, {"early_stop_loss": None, "linf_reference_d_mlp": None}) == []
    assert field_problems(FTHParams, {"params": "attn", "steps": 2.5, "lr": True}) == [
        "FTHParams.params='attn' (must be one of ['down_proj', 'mlp'])",
        "FTHParams.steps=2.5 (must be an integer)",
        "FTHParams.lr=True (must be a number)",
    ]
    assert field_problems(RomeHParams, {"context_template_lengths": (5, 0), "early_stop_prob": 1.5}) == [
        "RomeHParams.context_template_lengths=(5, 0) (must be positive)",
        "RomeHParams.early_stop_prob=1.5 (must be in [0, 1])",
    ]
