"""EMMET and AlphaEdit: their solves against hand-computed ones (numpy, explicit inverses),
EMMET's equality constraint for every edited key, AlphaEdit's zero update on the preserved
subspace, and both methods end to end through the editor, the registry and the tuning space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locedit.editing import (
    ALL_METHODS,
    METHODS,
    AlphaEditHParams,
    CovarianceSolver,
    EditFailed,
    EditRequest,
    EmmetHParams,
    edited,
    get_method,
    hparams_for,
    key_stats_methods,
)
from locedit.editing.alphaedit import alphaedit_delta, null_space, null_space_for
from locedit.editing.emmet import emmet_delta
from locedit.editing.memit import effective_mom2_weight
from locedit.models.architecture import as_out_in, down_proj_name, down_proj_weight
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import encode_prompt, encode_target
from locedit.testing import editable_tiny_model
from locedit.tuning.space import TuneConfig, search_space

PROMPT = "My favourite place is the Eiffel Tower"
FAST = {"n_context_templates": 2, "context_template_lengths": (4,)}


def _random_problem(d_mlp=12, d_out=7, batch=3, seed=0):
    """A well-conditioned SPD second moment C, keys K [d_mlp, B] and wanted changes R."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d_mlp, 4 * d_mlp))
    c = a @ a.T / (4 * d_mlp) + 0.1 * np.eye(d_mlp)
    return c, rng.normal(size=(d_mlp, batch)), rng.normal(size=(d_out, batch))


def _t(array):
    return torch.from_numpy(np.asarray(array, dtype=np.float64))


# --------------------------------------------------------------------------- EMMET


@pytest.mark.parametrize("batch", [1, 4])
def test_emmet_equality_constraint_holds_for_every_key(batch):
    """lambda_emmet = 0: W'k_j = W k_j + r_j for every key j, to 1e-8 relative (float64), and the
    update is the hand-computed R (K^T C_w^-1 K)^-1 K^T C_w^-1 (w cancels)."""
    c, k, r = _random_problem(batch=batch)
    delta, numbers = emmet_delta(_t(k), _t(r), CovarianceSolver(_t(c)), 1234.5, 0.0)
    delta = delta.numpy()
    for j in range(batch):
        gap = np.linalg.norm(delta @ k[:, j] - r[:, j]) / np.linalg.norm(r[:, j])
        assert gap < 1e-8
    c_inv = np.linalg.inv(c)
    expected = r @ np.linalg.inv(k.T @ c_inv @ k) @ k.T @ c_inv
    np.testing.assert_allclose(delta, expected, rtol=1e-8, atol=1e-10)
    assert numbers["realised_share"] == pytest.approx(1.0, abs=1e-10)


def test_emmet_with_lambda_matches_the_hand_solve_and_its_stated_deviation():
    """lambda_emmet > 0: dW = R (K^T C_w^-1 K + lambda I)^-1 K^T C_w^-1, so the constraint is
    missed by exactly dW K - R = -lambda R D^-1 (D the regularised matrix)."""
    c, k, r = _random_problem(batch=3, seed=1)
    weight, lam = 50.0, 0.3
    delta = emmet_delta(_t(k), _t(r), CovarianceSolver(_t(c)), weight, lam)[0].numpy()
    cw_inv = np.linalg.inv(weight * c)
    d = k.T @ cw_inv @ k + lam * np.eye(3)
    np.testing.assert_allclose(delta, r @ np.linalg.inv(d) @ k.T @ cw_inv, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(delta @ k - r, -lam * r @ np.linalg.inv(d), rtol=1e-7, atol=1e-12)


def test_emmet_is_the_least_change_of_preserved_outputs_among_exact_updates():
    """Among updates with dW K = R, EMMET's minimises tr(dW C dW^T) = E||dW k_0||^2."""
    c, k, r = _random_problem(batch=2, seed=2)
    delta = emmet_delta(_t(k), _t(r), CovarianceSolver(_t(c)), 1.0, 0.0)[0].numpy()
    rng = np.random.default_rng(3)
    # any other exact update adds E with E K = 0
    basis = np.linalg.svd(k.T)[2][2:].T  # directions orthogonal to the keys
    for _ in range(5):
        other = delta + rng.normal(size=(r.shape[0], basis.shape[1])) @ basis.T * 0.1
        np.testing.assert_allclose(other @ k, r, atol=1e-9)
        assert np.trace(other @ c @ other.T) > np.trace(delta @ c @ delta.T)


def test_emmet_single_key_is_memit_with_covariance_weight_w_lambda():
    c, k, r = _random_problem(batch=1, seed=4)
    weight, lam = 200.0, 0.5
    delta = emmet_delta(_t(k), _t(r), CovarianceSolver(_t(c)), weight, lam)[0].numpy()
    k0, r0 = k[:, 0], r[:, 0]
    memit = np.outer(r0, np.linalg.solve(weight * lam * c + np.outer(k0, k0), k0))
    np.testing.assert_allclose(delta, memit, rtol=1e-9, atol=1e-12)


def test_emmet_refuses_dependent_keys_without_lambda():
    c, k, r = _random_problem(batch=2, seed=5)
    k[:, 1] = 2 * k[:, 0]
    from locedit.editing import SingularCovarianceError

    with pytest.raises(SingularCovarianceError):
        emmet_delta(_t(k), _t(r), CovarianceSolver(_t(c)), 1.0, 0.0)
    # a ridge makes the batch solvable again (the reference's reason for lambda_emmet)
    assert torch.isfinite(emmet_delta(_t(k), _t(r), CovarianceSolver(_t(c)), 1.0, 0.1)[0]).all()


# --------------------------------------------------------------------------- AlphaEdit


def _spectrum_moment(d_mlp=16, seed=0):
    """C = U diag(s) U^T with 10 large and 6 tiny eigenvalues (below 2e-2)."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(d_mlp, d_mlp)))[0]
    s = np.concatenate([np.linspace(0.5, 5.0, 10), [1e-3, 5e-3, 1e-4, 1e-6, 0.0, 1.5e-2]])
    return u @ np.diag(s) @ u.T, u[:, :10], u[:, 10:]


def test_null_space_keeps_the_eigenvectors_below_the_threshold():
    c, large, small = _spectrum_moment()
    space = null_space(_t(c), 2e-2)
    assert space.dim == 6 and space.threshold == 2e-2
    np.testing.assert_allclose(space.projector.numpy(), small @ small.T, atol=1e-10)
    mean = np.trace(c) / 16
    relative = null_space(_t(c), 2e-2 / mean, relative=True)
    assert relative.dim == 6 and relative.threshold == pytest.approx(2e-2)
    assert null_space(_t(c), 1e-7).dim == 1  # only the zero eigenvalue


@pytest.mark.parametrize(("batch", "n_previous"), [(1, 0), (3, 0), (2, 3)])
def test_alphaedit_matches_the_explicit_inverse_and_leaves_preserved_keys_alone(batch, n_previous):
    """dW^T = (P (K K^T + K_p K_p^T) + L2 I)^-1 P K R^T by an explicit inverse; dW U_large = 0 to
    1e-10 of ||dW||, and keys drawn in the preserved subspace keep their outputs."""
    c, large, _small = _spectrum_moment(seed=batch)
    rng = np.random.default_rng(10 + batch)
    k, r = rng.normal(size=(16, batch)), rng.normal(size=(5, batch))
    previous = rng.normal(size=(16, n_previous)) if n_previous else None
    space = null_space(_t(c), 2e-2)
    delta, _ = alphaedit_delta(
        _t(k), _t(r), space.projector, 10.0, None if previous is None else _t(previous)
    )
    delta = delta.numpy()
    p = space.projector.numpy()
    every = k if previous is None else np.concatenate([k, previous], 1)
    explicit = np.linalg.inv(p @ every @ every.T + 10.0 * np.eye(16)) @ p @ k @ r.T
    np.testing.assert_allclose(delta, explicit.T, rtol=1e-9, atol=1e-12)
    norm = np.linalg.norm(delta)
    assert norm > 0
    assert np.linalg.norm(delta @ large) <= 1e-10 * norm
    preserved = large @ rng.normal(size=(10, 20))  # keys K_0 in the preserved subspace
    assert np.linalg.norm(delta @ preserved) <= 1e-10 * norm * np.linalg.norm(preserved)


def test_alphaedit_needs_a_positive_ridge():
    c, _, _ = _spectrum_moment()
    with pytest.raises(ValueError, match="L2 > 0"):
        alphaedit_delta(
            _t(np.ones((16, 1))), _t(np.ones((4, 1))), null_space(_t(c), 2e-2).projector, 0.0
        )


def test_projector_is_cached_per_layer_and_threshold(tok, store):
    model = editable_tiny_model("gpt2", n_layers=4)
    first = null_space_for(store, model, 1, 0.5, relative=True)
    assert null_space_for(store, model, 1, 0.5, relative=True) is first
    assert null_space_for(store, model, 1, 0.1, relative=True) is not first
    assert null_space_for(store, model, 2, 0.5, relative=True) is not first


# --------------------------------------------------------------------------- end to end


def _p_rome(model, tok) -> float:
    ids = encode_prompt(tok, PROMPT, "Eiffel Tower").input_ids
    return target_log_probs(model, [ids], [encode_target(tok, PROMPT, "Rome")]).exp().item()


def _layer(model, originals, result, store, layer):
    """The realised update dW_l (out x in), the key k_l and change r_l the spread gave the
    layer's solve, and the layer's second moment C_l, as float64 numpy arrays."""
    delta = (
        as_out_in(model, down_proj_weight(model, layer).detach())
        - as_out_in(model, originals[down_proj_name(model, layer)])
    ).double()
    k = result.tensors[f"k_l{layer}"].double().numpy()
    r = result.tensors[f"r_l{layer}"].double().numpy()
    return delta.numpy(), k, r, store.get(model, layer).numpy()


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_emmet_edits_its_window_exactly_as_solved_and_restores(family, tok, store):
    model = editable_tiny_model(family, n_layers=8)
    before = _p_rome(model, tok)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    hp = hparams_for("emmet", overrides={**FAST, "emmet_lambda": 0.0})
    assert isinstance(hp, EmmetHParams)
    with edited(
        model, tok, "emmet", EditRequest(PROMPT, "Eiffel Tower", "Rome"), 3, hp, store
    ) as result:
        after = _p_rome(model, tok)
        window = [1, 2, 3, 4, 5]
        assert result.layers == window
        assert sorted(result.changed) == sorted(down_proj_name(model, j) for j in window)
        for layer in window:
            delta, k, r, c = _layer(model, originals, result, store, layer)
            # hand solve for one key: r (C^-1 k)^T / (k^T C^-1 k); exact at the key
            c_inv_k = np.linalg.solve(c, k)
            expected = np.outer(r, c_inv_k) / (k @ c_inv_k)
            scale = np.linalg.norm(expected)
            assert np.linalg.norm(delta - expected) <= 1e-5 * scale  # float32 weights
            assert np.linalg.norm(delta @ k - r) <= 1e-5 * np.linalg.norm(r)
            assert result.diagnostics[f"realised_share_l{layer}"] == pytest.approx(1.0, abs=1e-9)
    assert after > 5 * before
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name])


def test_emmet_default_lambda_softens_the_constraint_as_stated(tok, store):
    model = editable_tiny_model("gpt2", n_layers=6)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    hp = hparams_for("emmet", overrides={**FAST, "v_steps": 4})
    assert hp.emmet_lambda == 0.1 and hp.mom2_weight == 10000.0
    with edited(
        model, tok, "emmet", EditRequest(PROMPT, "Eiffel Tower", "Rome"), 2, hp, store
    ) as result:
        for layer in result.layers:
            delta, k, r, c = _layer(model, originals, result, store, layer)
            w = effective_mom2_weight(hp, k.shape[0])
            d = k @ np.linalg.solve(w * c, k)  # k^T C_w^-1 k
            expected = np.outer(r, np.linalg.solve(w * c, k)) / (d + hp.emmet_lambda)
            assert np.linalg.norm(delta - expected) <= 1e-5 * np.linalg.norm(expected)
            share = result.diagnostics[f"realised_share_l{layer}"]
            assert share == pytest.approx(d / (d + hp.emmet_lambda), rel=1e-9)
            assert share < 1.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_alphaedit_edits_only_the_null_space_and_restores(family, tok, store):
    model = editable_tiny_model(family, n_layers=8)
    before = _p_rome(model, tok)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    # the tiny store's keys are not on GPT-J's scale: a relative threshold and a small ridge
    hp = hparams_for(
        "alphaedit",
        overrides={**FAST, "nullspace_threshold": 0.5, "nullspace_relative": True, "L2": 1e-3},
    )
    assert isinstance(hp, AlphaEditHParams)
    with edited(
        model, tok, "alphaedit", EditRequest(PROMPT, "Eiffel Tower", "Rome"), 3, hp, store
    ) as result:
        after = _p_rome(model, tok)
        window = [1, 2, 3, 4, 5]
        assert sorted(result.changed) == sorted(down_proj_name(model, j) for j in window)
        for layer in window:
            delta, k, r, c = _layer(model, originals, result, store, layer)
            values, vectors = np.linalg.eigh(c)
            cut = 0.5 * np.trace(c) / c.shape[0]
            small, large = vectors[:, values < cut], vectors[:, values >= cut]
            assert result.diagnostics[f"nullspace_dim_l{layer}"] == small.shape[1] > 0
            p = small @ small.T
            explicit = (
                np.linalg.inv(p @ np.outer(k, k) + hp.L2 * np.eye(len(k))) @ p @ np.outer(k, r)
            )
            norm = np.linalg.norm(explicit)
            assert np.linalg.norm(delta - explicit.T) <= 1e-5 * norm  # float32 weights
            assert np.linalg.norm(delta @ large) <= 1e-5 * norm
    assert after > before
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name])


def test_alphaedit_with_an_empty_null_space_fails_and_restores(tok, store):
    model = editable_tiny_model("gpt2", n_layers=4)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    hp = hparams_for("alphaedit", overrides={**FAST, "v_steps": 2, "nullspace_threshold": 1e-30})
    with pytest.raises(EditFailed, match="null space is empty"):
        with edited(
            model, tok, "alphaedit", EditRequest(PROMPT, "Eiffel Tower", "Rome"), 1, hp, store
        ):
            pytest.fail("the block must not run")
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name])


# --------------------------------------------------------------------------- registry, config, tuning


def test_registry_entries_are_off_by_default_but_selectable():
    assert METHODS == ("rome", "memit", "ft1", "ft5")
    assert ALL_METHODS == (*METHODS, "emmet", "alphaedit")
    for name, cls in (("emmet", EmmetHParams), ("alphaedit", AlphaEditHParams)):
        m = get_method(name)
        assert (m.hparams, m.needs_key_stats, m.window, m.window_field) == (
            cls,
            True,
            5,
            "n_layers",
        )
        assert (m.tuned_field, m.steps_field, m.in_paper) == ("kl_factor", "v_steps", False)
        assert m.layers(9, 18, hparams_for(name, overrides={"n_layers": 3})) == [8, 9, 10]
    assert key_stats_methods(["ft1", "emmet", "alphaedit"]) == ["emmet", "alphaedit"]


def test_composed_config_gives_their_defaults_and_mirrors_memit():
    from locedit.params import compose_params

    params = compose_params("conf")
    assert list(params.edit.methods) == list(METHODS)
    for name in ("emmet", "alphaedit"):
        assert hparams_for(name, params).v_lr_relative == 0.02  # gemma-3-270m, as MEMIT
        assert hparams_for(name, params, problem="error_injection").kl_factor == 0.9
        assert hparams_for(name, params, problem="fact_forcing").v_steps == 25
    assert hparams_for("emmet", params).emmet_lambda == 0.1
    alpha = hparams_for("alphaedit", params)
    assert (alpha.nullspace_threshold, alpha.nullspace_relative, alpha.L2) == (0.02, False, 10.0)
    # the conf sections list every field of the dataclasses (nothing left to code defaults)
    for name, cls in (("emmet", EmmetHParams), ("alphaedit", AlphaEditHParams)):
        assert set(params.method[name]) == {f for f in cls.__dataclass_fields__ if f != "seed"}


def test_tuning_space_includes_their_own_hyperparameters():
    from locedit.params import compose_params

    tune = compose_params("conf").tune
    search = TuneConfig.from_params(tune, mode="search")
    emmet = search_space("emmet", "fact_forcing", search)
    assert emmet.fields == ("kl_factor", "emmet_lambda", "v_steps")
    assert emmet.to_dict()["emmet_lambda"] == [1e-3, 10.0]
    alpha = search_space("alphaedit", "error_injection", search)
    assert alpha.fields == ("kl_factor", "nullspace_threshold")
    assert alpha.to_dict()["nullspace_threshold"] == [1e-4, 1.0]
    # grid mode: the paper's KL grid alone, unless tune.grid lists the method's own values
    grid = TuneConfig.from_params(tune)
    assert search_space("emmet", "error_injection", grid).fields == ("kl_factor",)
    product = TuneConfig.from_params(
        {**dict(tune), "grid": {**dict(tune.grid), "emmet_lambda": [0.0, 0.1]}}
    )
    space = search_space("emmet", "error_injection", product)
    assert space.grid_search_space() == {
        "kl_factor": [0.0625, 0.9, 1.0],
        "emmet_lambda": [0.0, 0.1],
    }
    assert len(space.grid_points()) == 6 and space.grid_points()[1] == {
        "kl_factor": 0.0625,
        "emmet_lambda": 0.1,
    }
    # the paper's methods' spaces are unchanged (their study identities too)
    assert set(search_space("memit", "error_injection", search).to_dict()) == {
        "method",
        "problem",
        "mode",
        "field",
        "range",
    }


def test_both_run_through_the_sweep(tmp_path):
    """Selected with edit.methods=[emmet, alphaedit], every edit of the tiny sweep succeeds."""
    from omegaconf import OmegaConf
    from test_sweep import make_params

    from locedit.pipeline import edit as edit_stage
    from locedit.sweep import ResultStore, results_table, run_sweep

    params = make_params(tmp_path, methods=("emmet", "alphaedit"), problems=("error_injection",))
    fast = {"v_steps": 4, "n_context_templates": 2, "context_template_lengths": [4]}
    params = OmegaConf.merge(
        params,
        {
            "method": {
                "emmet": fast,
                "alphaedit": {
                    **fast,
                    "nullspace_threshold": 0.5,
                    "nullspace_relative": True,
                    "L2": 1e-3,
                },
            }
        },
    )
    spec = edit_stage.build_spec(params)
    assert len(spec.tasks) == 3 * 2 * 2
    assert run_sweep(spec, progress=False) == 12
    table = results_table(ResultStore(spec.out_dir).rows(), [t.key for t in spec.tasks])
    assert (table.status == "ok").all(), table[table.status != "ok"][["key", "reason"]].to_string()
    assert set(table.method) == {"emmet", "alphaedit"}
    assert table["rewrite_score"].notna().all()


def test_locedit_edit_runs_them_by_name(tmp_path, capsys):
    from omegaconf import OmegaConf

    from locedit.editing.cli import main
    from locedit.pipeline.common import compose_params
    from locedit.testing import gpt2_tokenizer

    model_dir = tmp_path / "tiny"
    editable_tiny_model("gpt2", n_layers=4).save_pretrained(model_dir)
    gpt2_tokenizer().save_pretrained(model_dir)
    overrides = [
        f"model.name={model_dir}",
        f"paths.outputs={tmp_path / 'outputs'}", f"paths.reports={tmp_path / 'reports'}",
        "stats.n_samples=8",
        "stats.sample_length=16",
    ]
    for name in ("emmet", "alphaedit"):
        overrides += [
            f"method.{name}.v_steps=3",
            f"method.{name}.n_context_templates=1",
            f"method.{name}.context_template_lengths=[4]",
        ]
    overrides += [
        "method.alphaedit.nullspace_relative=true",
        "method.alphaedit.nullspace_threshold=0.5",
    ]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(OmegaConf.to_yaml(compose_params("conf", overrides)))
    argv = [
        "--prompt",
        "The Eiffel Tower is located in",
        "--subject",
        "Eiffel Tower",
        "--target",
        "Rome",
        "--layer",
        "1",
        "--params",
        str(params_file),
        "--method",
        "emmet",
        "--method",
        "alphaedit",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("emmet", "alphaedit"):
        assert any(
            line.strip().startswith(f"{name} ") and "layers [0, 1, 2, 3]" in line
            for line in out.splitlines()
        ), out


def test_the_tune_stage_searches_emmet_lambda(tmp_path):
    """A search-mode study of EMMET chooses the KL weight and emmet_lambda together, and the
    chosen values are EmmetHParams fields the edit stage can apply."""
    import optuna
    from test_tuning import make_params

    from locedit.pipeline import tune as tune_stage
    from locedit.testing import save_tiny

    shared = {
        "model": save_tiny(tmp_path / "tiny", "gpt2", n_layers=3),
        "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
    }
    params = make_params(
        tmp_path,
        shared,
        methods=("emmet",),
        extra=[
            "tune.mode=search",
            "tune.n_trials=2",
            "tune.n_facts=2",
            "tune.search.n_startup_trials=2",
            "tune.search.pruner=none",
            "tune.plots=false",
            "method.emmet.v_steps=3",
            "method.emmet.n_context_templates=1",
            "method.emmet.context_template_lengths=[4]",
        ],
    )
    result = tune_stage.run_single(params, method="emmet", problem="error_injection")
    study = optuna.load_study(study_name=result.study_name, storage=params.tune.storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2
    for trial in trials:
        assert set(trial.params) == {"kl_factor", "emmet_lambda"}
        assert 1e-3 <= trial.params["emmet_lambda"] <= 10.0
    chosen = result.selection.params
    assert set(chosen) == {"kl_factor", "emmet_lambda"}
    assert hparams_for("emmet", params, overrides=chosen).emmet_lambda == chosen["emmet_lambda"]
