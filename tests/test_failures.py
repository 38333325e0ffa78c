"""What a user meets when something is wrong: one clear message, not a traceback."""

from __future__ import annotations

import time

import pytest

from locedit.cli import main
from locedit.models.loading import ModelLoadError, convert_bundled, load_model
from locedit.sweep import sweep_layers
from locedit.testing import save_tiny


def test_wrong_model_name_says_what_is_accepted(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "no" / "such-model"), cache_dir=tmp_path)
    assert "gemma-3-270m" in str(err.value) and "hub id" in str(err.value)


def test_missing_data_file_through_the_cli(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["compose", "--conf", str(_conf()), "--output", "params.yaml"]) == 0
    code = main(["run", "prepare", "--set", f"data.root={tmp_path / 'nowhere'}"])
    assert code == 2
    assert "curl -fL" in caplog.text and "counterfact" in caplog.text


def test_layer_beyond_the_model_is_named():
    with pytest.raises(IndexError, match=r"edit.layers \[40\] out of range: the model has layers 0..17"):
        sweep_layers({"layers": [3, 40], "methods": ["rome"]}, 18)


def test_unwritable_cache_directory_is_explained(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelLoadError, match="not writable.*LOCEDIT_CACHE"):
        convert_bundled("gemma-3-270m", cache_dir=blocker / "cache")


def _conf():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "conf"


def test_a_filter_that_keeps_nothing_stops_with_what_to_change(tmp_path):
    from e2e_support import tiny_params

    from locedit.pipeline import filter as filter_stage
    from locedit.pipeline import prepare

    params = tiny_params(tmp_path, "default", ["data.filter.min_p_true=1.5"])
    prepare.run(params)
    with pytest.raises(SystemExit, match="min_p_true"):
        filter_stage.run(params)


def test_a_full_disk_says_so_and_that_the_run_resumes(tmp_path, monkeypatch, caplog):
    import errno

    from locedit.pipeline import prepare

    monkeypatch.chdir(tmp_path)
    assert main(["compose", "--conf", str(_conf()), "--output", "params.yaml"]) == 0

    def full(_params):
        raise OSError(errno.ENOSPC, "No space left on device", "outputs/edit/rows/main.jsonl")

    monkeypatch.setattr(prepare, "run", full)
    assert main(["run", "prepare"]) == 2
    assert "disk is full writing outputs/edit/rows/main.jsonl" in caplog.text
    assert "resumes" in caplog.text


@pytest.mark.parametrize("how", ["env", "no network"])
def test_an_unknown_model_name_without_network_fails_fast_with_the_bundled_names(monkeypatch, tmp_path, how):
    from locedit.models import loading

    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(loading, "_hub_reachable", lambda timeout: False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model("does-not-exist", cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "gemma-3-270m" in message and "smollm2-135m" in message and "cannot be reached" in message
    assert "\n" not in message


def test_a_tokenizer_larger_than_the_model_vocabulary_is_named_at_load(tmp_path):
    folder = save_tiny(tmp_path / "small-vocab", "gpt2", n_layers=1, vocab_size=1000)
    with pytest.raises(ModelLoadError, match="tokenizer has 50257 tokens but the model's vocabulary has 1000"):
        load_model(str(folder))


def test_set_values_are_typed_and_bad_counts_refused(tmp_path, monkeypatch, caplog):
    from omegaconf import OmegaConf

    from locedit.pipeline.common import apply_overrides

    params = OmegaConf.create({"method": {"rome": {"kl_factor": 0.0625}}, "edit": {"methods": ["ft1"]},
                               "data": {"n_records": 4, "start": 0}})
    apply_overrides(params, ["method.rome.kl_factor=0.9", "edit.methods=[rome,memit]", "data.n_records=null"])
    assert params.method.rome.kl_factor == 0.9 and list(params.edit.methods) == ["rome", "memit"]
    assert params.data.n_records is None
    for bad, expected in [("data.n_records=-5", "data.n_records=-5"), ("data.n_records=0", "positive"),
                          ("data.start=-1", "non-negative"), ("data.n_records=2.5", "integer")]:
        with pytest.raises(ValueError, match=expected):
            apply_overrides(OmegaConf.create({"data": {"n_records": 4, "start": 0}}), [bad])
    # through the CLI: exit status 2, one line naming the key
    monkeypatch.chdir(tmp_path)
    assert main(["compose", "--conf", str(_conf()), "--output", "params.yaml"]) == 0
    assert main(["run", "prepare", "--set", "data.n_records=-5"]) == 2
    assert "data.n_records=-5 (must be a positive integer or null)" in caplog.text
    assert main(["run", "prepare", "--set", "edit.methods=[rome"]) == 2
    assert "cannot parse" in caplog.text
