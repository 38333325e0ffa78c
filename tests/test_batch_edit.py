"""Batched edits (MEMIT's Alg. 1, EMMET's batch): MEMIT's Woodbury solve against an explicit
inverse, EMMET's equality constraint for every co-edited key at every window layer, the
editor's refusal of co-edits a method was not configured for, the seeded order-free draw of
co-edited facts, and a tiny sweep whose rows name their co-edits and resume from the store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_emmet_alphaedit import _random_problem, _t

from locedit.data.records import FactRecord
from locedit.editing import CovarianceSolver, EditRequest, edited, hparams_for
from locedit.editing import emmet as emmet_module
from locedit.editing.memit import effective_mom2_weight, memit_delta, memit_solve
from locedit.editing.spread import LayerProblem
from locedit.models.architecture import as_out_in, down_proj_name, down_proj_weight
from locedit.sweep.plan import co_facts_for, draw_co_facts, plan_tasks
from locedit.testing import editable_tiny_model

FAST = {"n_context_templates": 2, "context_template_lengths": (4,), "v_steps": 4}
FOCAL = EditRequest("My favourite place is the Eiffel Tower", "Eiffel Tower", "Rome")
CO = (
    EditRequest("Danielle Darrieux speaks", "Danielle Darrieux", "English"),
    EditRequest("Toko Yasuda plays the", "Toko Yasuda", "piano"),
)


# --------------------------------------------------------------------------- MEMIT's solve


def test_memit_batched_solve_matches_the_explicit_inverse():
    """dW = R K^T (lambda C + K K^T)^-1 for B = 3, by numpy's explicit inverse."""
    c, k, r = _random_problem(batch=3)
    lam = 7.5
    delta, numbers = memit_delta(_t(k), _t(r), CovarianceSolver(_t(c)), lam)
    expected = r @ k.T @ np.linalg.inv(lam * c + k @ k.T)
    np.testing.assert_allclose(delta.numpy(), expected, rtol=1e-9, atol=1e-12)
    share = np.sum(r * (expected @ k)) / np.sum(r * r)
    assert numbers["realised_share"] == pytest.approx(share, rel=1e-9)
    assert 0 < share < 1  # a least-squares update, not an exact one


class _Store:
    """The covariance interface a LayerProblem uses, over one fixed second moment."""

    def __init__(self, c):
        self.c = c

    def solver(self, model, layer, ridge):
        return CovarianceSolver(_t(self.c))


def test_memit_single_key_is_unchanged_and_woodbury_agrees_with_it():
    """B = 1 runs the Sherman-Morrison solve of the single-edit code bit for bit (a frozen copy
    of it below); the Woodbury form gives the same update to rounding."""
    c, k, r = _random_problem(batch=1, seed=3)
    hp = hparams_for("memit")
    update = memit_solve(LayerProblem(None, "memit", 0, _t(k), _t(r), hp, _Store(c)))
    # the single-edit solve as it was before batches existed
    solver = CovarianceSolver(_t(c))
    key, residual = _t(k)[:, 0], _t(r)[:, 0]
    weight = effective_mom2_weight(hp, key.shape[0])
    x = solver.solve(key) / weight
    frozen = torch.outer(residual, x / (1.0 + float(key @ x)))
    assert torch.equal(update.delta_out_in, frozen)
    woodbury = memit_delta(_t(k), _t(r), solver, weight)[0]
    torch.testing.assert_close(woodbury, frozen, rtol=1e-12, atol=1e-15)


def test_batched_memit_solve_goes_through_the_layer_problem():
    c, k, r = _random_problem(batch=3, seed=4)
    hp = hparams_for("memit")
    update = memit_solve(LayerProblem(None, "memit", 2, _t(k), _t(r), hp, _Store(c)))
    lam = effective_mom2_weight(hp, k.shape[0])
    expected = r @ k.T @ np.linalg.inv(lam * c + k @ k.T)
    np.testing.assert_allclose(update.delta_out_in.numpy(), expected, rtol=1e-8, atol=1e-12)
    assert update.diagnostics["mom2_weight"] == lam


# --------------------------------------------------------------------------- edits end to end


def test_emmet_batch_meets_every_edited_key_at_every_layer_and_restores(tok, store, monkeypatch):
    """lambda_emmet = 0, B = 3: at each window layer the update the spread applies satisfies
    dW k_j = r_j for the edited fact and both co-edited facts; the focal columns are the ones
    the result reports; the weights come back bit for bit."""
    seen = {}
    original = emmet_module.emmet_solve

    def recording(problem):
        update = original(problem)
        seen[problem.layer] = (problem.keys.clone(), problem.residuals.clone(), update)
        return update

    monkeypatch.setattr(emmet_module, "emmet_solve", recording)
    model = editable_tiny_model("gpt2", n_layers=6)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    hp = hparams_for("emmet", overrides={**FAST, "emmet_lambda": 0.0, "batch_size": 3})
    with edited(model, tok, "emmet", FOCAL, 2, hp, store, CO) as result:
        assert sorted(seen) == result.layers == [0, 1, 2, 3, 4]
        for layer, (keys, residuals, update) in seen.items():
            assert keys.shape[1] == residuals.shape[1] == 3
            delta = update.delta_out_in
            for j in range(3):
                gap = (delta @ keys[:, j] - residuals[:, j]).norm() / residuals[:, j].norm()
                assert float(gap) < 1e-8
            applied = (
                as_out_in(model, down_proj_weight(model, layer).detach())
                - as_out_in(model, originals[down_proj_name(model, layer)])
            ).double()
            assert float((applied - delta).norm()) <= 1e-5 * float(delta.norm())
            torch.testing.assert_close(result.tensors[f"k_l{layer}"], keys[:, 0].float())
            torch.testing.assert_close(result.tensors[f"r_l{layer}"], residuals[:, 0].float())
            assert result.diagnostics[f"realised_share_l{layer}"] == pytest.approx(1.0, abs=1e-9)
        assert result.diagnostics["batch_size"] == 3.0
        assert 0 <= result.diagnostics["co_z_residual_fraction"] < 1
        assert 0 <= result.diagnostics["z_residual_fraction"] < 1
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name])


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("memit", {}),
        ("alphaedit", {"nullspace_threshold": 0.5, "nullspace_relative": True, "L2": 0.1}),
    ],
)
def test_memit_and_alphaedit_batches_edit_the_window_and_restore(tok, store, method, overrides):
    model = editable_tiny_model("gpt2", n_layers=4)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    hp = hparams_for(method, overrides={**FAST, **overrides, "batch_size": 2})
    with edited(model, tok, method, FOCAL, 1, hp, store, CO[:1]) as result:
        assert result.diagnostics["batch_size"] == 2.0
        assert sorted(result.changed) == sorted(down_proj_name(model, j) for j in result.layers)
        assert 0 <= result.diagnostics["co_z_residual_fraction"] <= 1.5
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name])


@pytest.mark.parametrize(
    ("method", "overrides", "co", "message"),
    [
        ("rome", {}, CO[:1], "no batch_size"),
        ("memit", {}, CO[:1], "batch_size 1"),
        ("emmet", {"batch_size": 3}, CO[:1], "got 1"),
        ("alphaedit", {"batch_size": 2}, (), "got 0"),
    ],
)
def test_co_edits_must_match_the_batch_size(tok, store, method, overrides, co, message):
    model = editable_tiny_model("gpt2", n_layers=4)
    hp = hparams_for(method, overrides={**FAST, **overrides})
    with pytest.raises(ValueError, match=message):
        with edited(model, tok, method, FOCAL, 1, hp, store, co):
            pass


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match=r"batch_size=0 \(must be positive\)"):
        hparams_for("emmet", overrides={"batch_size": 0})


# --------------------------------------------------------------------------- the co-edit draw


def test_co_edit_draw_is_seeded_order_free_and_excludes_the_focal_fact():
    ids = [f"f{i}" for i in range(20)]
    drawn = draw_co_facts(ids, "f3", 4, seed=0)
    assert len(drawn) == len(set(drawn)) == 4 and "f3" not in drawn
    assert set(drawn) <= set(ids)
    assert draw_co_facts(list(reversed(ids)), "f3", 4, seed=0) == drawn  # order-free
    assert draw_co_facts(ids, "f3", 2, seed=0) == drawn[:2]  # nested in the batch size
    assert draw_co_facts(ids, "f3", 4, seed=1) != drawn
    assert draw_co_facts(ids, "f4", 4, seed=0) != drawn
    assert draw_co_facts(ids, "f3", 0, seed=0) == ()
    with pytest.raises(ValueError, match="only 19"):
        draw_co_facts(ids, "f3", 20, seed=0)


def _fact(fact_id, erasure_ok=True, target_new="x"):
    return FactRecord(
        fact_id,
        "Eiffel Tower",
        "The Eiffel Tower is in",
        "Paris",
        target_new,
        extra={"erasure_ok": erasure_ok},
    )


def test_co_edits_come_from_the_facts_the_problem_applies_to():
    facts = [_fact("a"), _fact("b", erasure_ok=False), _fact("c"), _fact("d", target_new="")]
    hp = hparams_for("emmet", overrides={"batch_size": 2})
    for _ in range(5):
        assert co_facts_for(facts[0], facts, "fact_erasure", hp) == ("c",)
    assert co_facts_for(facts[0], facts, "error_injection", hp)[0] in {"b", "c"}
    assert co_facts_for(facts[0], facts, "error_injection", hparams_for("rome")) == ()


def test_planned_keys_name_the_co_edits():
    facts = [_fact("a"), _fact("b"), _fact("c")]
    single = {("emmet", "error_injection"): hparams_for("emmet")}
    batched = {("emmet", "error_injection"): hparams_for("emmet", overrides={"batch_size": 2})}
    one = plan_tasks(facts, [0], single, "ctx")
    two = plan_tasks(facts, [0], batched, "ctx")
    assert all(t.co_facts == () and "|co:" not in t.key for t in one)
    for task in two:
        assert len(task.co_facts) == 1 and task.fact_id not in task.co_facts
        assert task.key.endswith(f"|co:{task.co_facts[0]}")
    # a changed co-edited record re-keys the rows that co-edit it, and only those
    changed = [facts[0], facts[1], _fact("c", target_new="y")]
    again = {t.fact_id: t.key for t in plan_tasks(changed, [0], batched, "ctx")}
    for task in two:
        rekeyed = again[task.fact_id] != task.key
        assert rekeyed == (task.fact_id == "c" or task.co_facts == ("c",))


# --------------------------------------------------------------------------- the sweep


def test_batched_sweep_rows_name_their_co_edits_and_resume(tmp_path):
    from omegaconf import OmegaConf
    from test_sweep import make_params

    from locedit.pipeline import edit as edit_stage
    from locedit.sweep import ResultStore, results_table, run_sweep

    params = make_params(tmp_path, methods=("memit", "emmet"), problems=("error_injection",))
    fast = {"v_steps": 3, "n_context_templates": 1, "context_template_lengths": [4]}
    params = OmegaConf.merge(
        params, {"method": {"memit": fast, "emmet": {**fast, "batch_size": 2}}}
    )
    spec = edit_stage.build_spec(params)
    assert len(spec.tasks) == 3 * 2 * 2
    assert run_sweep(spec, progress=False) == 12
    table = results_table(ResultStore(spec.out_dir).rows(), [t.key for t in spec.tasks])
    assert (table.status == "ok").all(), table[table.status != "ok"][["key", "reason"]].to_string()
    emmet_rows = table[table.method == "emmet"]
    memit_rows = table[table.method == "memit"]
    assert memit_rows["co_facts"].isna().all()  # single edits add no column content
    for _, row in emmet_rows.iterrows():
        co = json.loads(row["co_facts"])
        assert len(co) == 1 and co[0] != row["fact_id"] and co[0] in {"f1", "f2", "f3"}
        assert json.loads(row["diagnostics"])["batch_size"] == 2.0
    # each fact keeps its co-edit across layers
    assert (emmet_rows.groupby("fact_id")["co_facts"].nunique() == 1).all()
    assert run_sweep(spec, progress=False) == 0  # resumes from the store
    # another batch size is another row, never a cached one
    bigger = OmegaConf.merge(params, {"method": {"emmet": {"batch_size": 3}}})
    assert run_sweep(edit_stage.build_spec(bigger), progress=False) == 6


def test_tuning_draws_co_edits_from_its_facts(monkeypatch):
    """The tune stage's edits are the sweep's: a batch_size above 1 co-edits tuning facts."""
    from locedit.tuning import objective

    calls = []

    def fake_run_facts(model, tok, cov, facts, tasks, hparams, config, on_row, cache, ctx, records,
                       group_size):
        assert [f.fact_id for f in facts] == [t.fact_id for t in tasks] and group_size == 1
        calls.extend((task.fact_id, task.co_facts, sorted(records)) for task in tasks)

    monkeypatch.setattr(objective, "run_facts", fake_run_facts)
    facts = [_fact("a"), _fact("b"), _fact("c")]
    target = objective.TuneTarget(
        None,
        None,
        None,
        facts,
        "emmet",
        "error_injection",
        0,
        hparams_for("emmet", overrides={"batch_size": 3}),
        None,
    )
    objective.evaluate(target, {})
    assert [c[0] for c in calls] == ["a", "b", "c"]
    for fact_id, co, records in calls:
        assert sorted(co) == sorted({"a", "b", "c"} - {fact_id}) and records == ["a", "b", "c"]


def test_batched_sweep_builds_co_edits_for_problems_with_model_made_targets(tmp_path):
    """Tracing Reversal's o_noise and Fact Forcing's subject noise of a co-edited fact come from
    the unedited model and the fact's own noise, as the edited fact's do."""
    from omegaconf import OmegaConf
    from test_sweep import make_params

    from locedit.pipeline import edit as edit_stage
    from locedit.sweep import ResultStore, results_table, run_sweep
    from locedit.sweep.worker import co_edit_requests

    params = make_params(
        tmp_path, methods=("emmet",), problems=("tracing_reversal", "fact_forcing")
    )
    fast = {"v_steps": 2, "n_context_templates": 1, "context_template_lengths": [4]}
    params = OmegaConf.merge(
        params, {"edit": {"layers": [1]}, "method": {"emmet": {**fast, "batch_size": 2}}}
    )
    spec = edit_stage.build_spec(params)
    assert run_sweep(spec, progress=False) == 6
    table = results_table(ResultStore(spec.out_dir).rows(), [t.key for t in spec.tasks])
    assert (table.status == "ok").all(), table[table.status != "ok"][["key", "reason"]].to_string()

    from locedit.pipeline.common import model_from_params

    model, tokenizer = model_from_params(params)
    forcing = next(t for t in spec.tasks if t.problem == "fact_forcing")
    (request,) = co_edit_requests(model, tokenizer, forcing, spec.records, spec.config)
    co = spec.records[forcing.co_facts[0]]
    assert request.target == co.target_true and request.prompt == co.prompt
    assert request.subject_noise is not None


def test_a_co_edit_with_the_same_key_needs_emmets_ridge(tok, store):
    """Same subject at the prompt's start: identical keys. EMMET's exact constraint cannot hold
    for two different changes at one key (a failed edit, weights restored); lambda > 0 solves."""
    from locedit.editing import EditFailed

    focal = EditRequest("Eiffel Tower is located in", "Eiffel Tower", "Rome")
    same = (EditRequest("Eiffel Tower was built by", "Eiffel Tower", "Gustave"),)
    model = editable_tiny_model("gpt2", n_layers=4)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    exact = hparams_for("emmet", overrides={**FAST, "emmet_lambda": 0.0, "batch_size": 2})
    # Which of the two refusals fires depends on the last bits of the key products (this
    # CPU's float64 kernels): the Cholesky factorisation fails, or it succeeds and the
    # eigenvalue-ratio check refuses. Either way the edit fails and the weights are restored.
    with pytest.raises(EditFailed, match="nearly singular|not positive definite"):
        with edited(model, tok, "emmet", focal, 1, exact, store, same):
            pass
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name])
    ridge = hparams_for("emmet", overrides={**FAST, "batch_size": 2})
    with edited(model, tok, "emmet", focal, 1, ridge, store, same) as result:
        assert result.diagnostics["batch_size"] == 2.0
        assert "large_update" not in result.flags
