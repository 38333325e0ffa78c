"""Independent edits optimised as one batch (issue 28) equal the same edits one at a time:
the batched v*/z* (:func:`optimise_vstars`) against :func:`optimise_vstar` per job, with jobs
that differ in layer and in fact, early stopping that ends some jobs and not others and a
non-finite job that fails alone; and whole ROME, MEMIT, EMMET and AlphaEdit edits (update,
p(target)) from batched v*/z* against the sequential editor."""

from __future__ import annotations

import dataclasses
import json
import shutil
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from locedit.editing import EditFailed, EditRequest, edited, grouped, hparams_for
from locedit.editing import deltas as deltas_module
from locedit.editing.batch import request_batch
from locedit.editing.editor import optimise_together
from locedit.editing.grouped import grouped_vstars
from locedit.editing.types import GroupedEdit
from locedit.editing.vstar import VStarJob, optimise_vstar, optimise_vstars
from locedit.models.architecture import component_module, down_proj_name
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import encode_prompt, encode_target
from locedit.pipeline import edit as edit_stage
from locedit.sweep import ResultStore, results_table, run_sweep
from locedit.sweep import worker as sweep_worker
from locedit.testing import editable_tiny_model

REL = 1e-5
FAST = {"n_context_templates": 2, "context_template_lengths": (4,), "v_steps": 6}
EIFFEL = EditRequest("My favourite place is the Eiffel Tower", "Eiffel Tower", "Rome")
DARRIEUX = EditRequest("Danielle Darrieux speaks", "Danielle Darrieux", "English")
YASUDA = EditRequest("Toko Yasuda plays the", "Toko Yasuda", "piano")
TEMPLATES = ["{}", "Hello there. {}"]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> None:
    """Equal within ``rel`` of b's norm (elementwise tolerances are meaningless for the
    components that are zero to rounding)."""
    scale = float(b.double().norm())
    assert float((a.double() - b.double()).norm()) <= rel * max(scale, 1e-12), (a, b)


def _rome_jobs(model, tok, hp, cases):
    """One ROME v* job per (request, layer): the MLP output of the layer, layers below frozen."""
    return [
        VStarJob(
            request_batch(model, tok, request, TEMPLATES, hp),
            component_module(model, "mlp", layer), layer, hp, request.direction, "rome",
        )
        for request, layer in cases
    ]


def _sequential(model, job):
    return optimise_vstar(
        model, job.batch, job.module, job.n_frozen, job.hparams, job.direction, job.method
    )


def _assert_same(got, want):
    _close(got.delta, want.delta)
    _close(got.init, want.init)
    assert got.steps == want.steps and got.zeroed_steps == want.zeroed_steps
    for name in ("loss_first", "loss_last", "nll_first", "nll_last", "objective_last"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=REL)


# Jobs that differ in fact and in layer, two facts sharing a layer; none at the last layer,
# whose MLP output at the subject cannot reach the target's positions (a zero gradient that
# Adam's normalisation turns into rounding noise, in the sequential run as much as here).
CASES = [(EIFFEL, 1), (EIFFEL, 2), (DARRIEUX, 0), (YASUDA, 2)]


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama", "gemma3_text"])
def test_batched_vstar_equals_one_optimisation_per_job(family, tok):
    model = editable_tiny_model(family, n_layers=4)
    hp = hparams_for("rome", overrides=FAST)
    jobs = _rome_jobs(model, tok, hp, CASES)
    for got, job in zip(optimise_vstars(model, jobs), jobs, strict=True):
        _assert_same(got, _sequential(model, job))


def test_vstar_steps_compute_no_indices_from_data(tok, monkeypatch):
    """On a GPU an index computed from data (``torch.nonzero``) waits for the device: the v*
    optimisation, one job or a batch of them, works out its row indices (the KL rows among
    them) before its steps, so 6 steps compute as many as 2."""
    model = editable_tiny_model("llama", n_layers=4)
    calls, nonzero = [], torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append(1) or nonzero(*a, **k))
    counts = {}
    for steps in (2, 6):
        hp = hparams_for("rome", overrides={**FAST, "v_steps": steps})
        jobs = _rome_jobs(model, tok, hp, CASES[:2])
        assert hp.kl_factor > 0 and bool(jobs[0].batch.kl.any())  # the KL rows are used
        calls.clear()
        assert _sequential(model, jobs[0]).steps == steps
        one = len(calls)
        calls.clear()
        assert [r.steps for r in optimise_vstars(model, jobs)] == [steps, steps]
        counts[steps] = (one, len(calls))
    assert counts[2] == counts[6]


def test_batched_zstar_with_relative_lr_and_fact_erasure(tok):
    """MEMIT's z* (residual output, layers up to it frozen), per-job learning rates from
    v_lr_relative, a minimising (Fact Erasure) job among maximising ones."""
    model = editable_tiny_model("llama", n_layers=4)
    hp = hparams_for("memit", overrides={**FAST, "v_lr_relative": 0.3})
    erase = EditRequest(YASUDA.prompt, YASUDA.subject, "piano", "minimize")
    jobs = [
        VStarJob(
            request_batch(model, tok, request, TEMPLATES, hp),
            component_module(model, "resid", layer), layer + 1, hp, request.direction, "memit",
        )
        for request, layer in [(EIFFEL, 2), (erase, 1), (DARRIEUX, 2)]
    ]
    for got, job in zip(optimise_vstars(model, jobs), jobs, strict=True):
        _assert_same(got, _sequential(model, job))


def test_early_stopping_ends_some_jobs_and_not_others(tok):
    model = editable_tiny_model("gpt2", n_layers=4)
    hp = hparams_for("rome", overrides={**FAST, "v_steps": 10})
    free = [_sequential(model, job) for job in _rome_jobs(model, tok, hp, CASES)]
    lasts = sorted(v.loss_last for v in free)
    # A threshold between the jobs' final losses: the better ones stop early, the rest run on.
    stopping = hp.with_overrides(early_stop_loss=(lasts[1] + lasts[2]) / 2)
    jobs = _rome_jobs(model, tok, stopping, CASES)
    want = [_sequential(model, job) for job in jobs]
    steps = {v.steps for v in want}
    assert min(steps) < 10 and max(steps) == 10  # the case the test is about
    for got, expected in zip(optimise_vstars(model, jobs), want, strict=True):
        _assert_same(got, expected)


def test_a_non_finite_job_fails_alone(tok):
    model = editable_tiny_model("gpt2", n_layers=4)
    hp = hparams_for("rome", overrides=FAST)
    # built past the hyperparameter checks (which refuse an infinite clamp), as a blow-up would
    broken = dataclasses.replace(hp, v_lr=1e37, clamp_norm_factor=float("inf"))
    jobs = _rome_jobs(model, tok, hp, CASES)
    jobs[1] = _rome_jobs(model, tok, broken, [CASES[1]])[0]
    with pytest.raises(EditFailed) as expected:
        _sequential(model, jobs[1])
    results = optimise_vstars(model, jobs)
    assert isinstance(results[1], EditFailed) and str(results[1]) == str(expected.value)
    for index in (0, 2, 3):
        _assert_same(results[index], _sequential(model, jobs[index]))


def _p_target(model, tok, request):
    ids = encode_prompt(tok, request.prompt, request.subject).input_ids
    return float(target_log_probs(model, [ids], [encode_target(tok, request.prompt, request.target)]).exp())


@pytest.mark.parametrize("method", ["rome", "memit", "emmet", "alphaedit"])
def test_whole_edits_from_batched_vstars_equal_sequential_edits(method, tok, store):
    """Every edit's weight change and p(target), batched v*/z* against the editor's own run;
    MEMIT also with a co-edited fact (two z* of one edit in the batch)."""
    model = editable_tiny_model("gpt2", n_layers=6)
    hp = hparams_for(method, overrides={**FAST, "n_layers": 3} if method != "rome" else FAST)
    edits = [GroupedEdit(method, EIFFEL, 2, hp), GroupedEdit(method, EIFFEL, 3, hp),
             GroupedEdit(method, DARRIEUX, 2, hp)]
    if method == "memit":
        edits.append(GroupedEdit(method, YASUDA, 3, hp.with_overrides(batch_size=2), (DARRIEUX,)))
    vstars = grouped_vstars(model, tok, edits, store)
    for edit, given in zip(edits, vstars, strict=True):
        assert len(given) == 1 + len(edit.co_requests)
        outcomes = []
        for use in ((), given):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with edited(model, tok, method, edit.request, edit.layer, edit.hparams, store,
                        edit.co_requests, use) as result:
                changes = {
                    name: p.detach() - before[name]
                    for name, p in model.named_parameters() if name in result.changed
                }
                outcomes.append((changes, _p_target(model, tok, edit.request), result))
        (want, p_want, r_want), (got, p_got, r_got) = outcomes
        assert sorted(got) == sorted(want) and want
        assert sorted(want) == sorted(down_proj_name(model, layer) for layer in r_want.layers)
        for name in want:
            _close(got[name], want[name])
        assert p_got == pytest.approx(p_want, rel=REL)
        assert r_got.flags == r_want.flags
        for key, value in r_want.diagnostics.items():
            assert r_got.diagnostics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_sweep_rows_with_grouped_edits_equal_one_at_a_time(tmp_path, monkeypatch):
    """The same sweep with edit.group_size 1 and 4 (v*/z* batched across two facts' layers,
    each fact's edits measured in the same forwards through hooks), and 4 with that
    measurement failing (each edit measured on
    its own): the same keys, statuses, flags and targets, every metric within 1e-5 (Fact
    Forcing's noised rows, the essence and the neighbourhood KL included); resuming the
    grouped run finds every row done."""
    from test_sweep import make_params

    sizes, refused, together = [], [], []

    @contextmanager
    def measured_together(model, deltas):
        with deltas_module.weight_deltas_by_group(model, deltas):
            yield
        together.append(len(deltas))  # reached only when the measurement did not fail

    monkeypatch.setattr(sweep_worker, "weight_deltas_by_group", measured_together)

    def counted(model, jobs):
        sizes.append(len(jobs))
        return optimise_vstars(model, jobs)

    monkeypatch.setattr(grouped, "optimise_vstars", counted)
    tables = []
    base = make_params(tmp_path, methods=("rome", "memit"),
                       problems=("error_injection", "fact_forcing"))
    # Weights large enough that the edits move p(target) (at the default scale the losses are
    # flat and Adam's normalised steps turn rounding into visible differences either way).
    editable_tiny_model("gpt2", n_layers=3).save_pretrained(base.model.name)
    for size, mode in ((1, "sequential"), (4, "grouped"), (4, "fallback")):
        if mode == "fallback":  # measuring together fails: each edit is measured on its own
            def refuse(model, deltas):
                refused.append(len(deltas))
                raise RuntimeError("out of memory (simulated)")

            monkeypatch.setattr(sweep_worker, "weight_deltas_by_group", refuse)
            sizes.clear()
        params = OmegaConf.merge(base, {
            "edit": {"layers": [0, 1], "group_size": size,
                     "neighborhood_kl": {"enabled": True}},
            "method": {"memit": {"n_layers": 1, "v_steps": 4, "n_context_templates": 2}},
        })
        spec = edit_stage.build_spec(params)
        assert run_sweep(spec, progress=False) == len(spec.tasks)
        # group_size 4 over two layers packs jobs of two facts (facts_per_job): per method and
        # problem one batch of the first two facts' four edits, one of the third fact's two
        assert sizes == ([] if size == 1 else [4] * 4 + [2] * 4)
        if size > 1:
            assert run_sweep(spec, progress=False) == 0
        table = results_table(ResultStore(spec.out_dir).rows(), [t.key for t in spec.tasks])
        tables.append(table.sort_values("key").reset_index(drop=True))
        shutil.rmtree(spec.out_dir)  # the second run computes everything again
    assert refused == [2] * 12 and together == [2] * 12
    one = tables[0]
    assert (one["status"] == "ok").all() and one["neighborhood_kl"].notna().all()
    for other in tables[1:]:
        _assert_same_rows(one, other)


def test_sweep_rows_with_grouped_finetuning_equal_one_at_a_time(tmp_path, monkeypatch, caplog):
    """FT-1 and FT-5 sweeps with edit.group_size 1, 3 and 6: one batched finetuning per (fact,
    method, problem) over its three layers, or over two facts' layers, the edits measured in the same forwards through
    hooks (the MLP weights finetuning trains, ``params: mlp``, for FT-5), and the same rows."""
    from test_sweep import make_params

    from locedit.editing import grouped_finetune

    sizes = []
    train = grouped_finetune.grouped_finetune

    def counted(model, tok, requests, windows, hp):
        sizes.append(len(requests))
        return train(model, tok, requests, windows, hp)

    monkeypatch.setattr(grouped_finetune, "grouped_finetune", counted)
    base = make_params(tmp_path, methods=("ft1", "ft5"),
                       problems=("error_injection", "fact_forcing"))
    editable_tiny_model("gpt2", n_layers=3).save_pretrained(base.model.name)
    OmegaConf.set_struct(base, False)
    tables = []
    for size in (1, 3, 6):
        sizes.clear()
        params = OmegaConf.merge(base, {
            "edit": {"layers": [0, 1, 2], "group_size": size},
            "method": {"ft": {"steps": 4, "lr": 1e-2, "linf_eps": 2e-2},
                       "ft5": {"params": "mlp"}},
        })
        spec = edit_stage.build_spec(params)
        assert run_sweep(spec, progress=False) == len(spec.tasks)
        # group_size 3: one batch per (fact, method, problem), its three layers; 6: two
        # facts' layers to a batch (jobs of two facts), the last fact's alone
        # (Fact Forcing's too: the facts' subject noise, of different lengths, stacked)
        assert len(spec.tasks) == 3 * 2 * 2 * 3  # facts x methods x problems x layers
        assert sizes == {1: [], 3: [3] * 12, 6: [6] * 4 + [3] * 4}[size]
        assert "one at a time" not in caplog.text  # every batch ran as one
        table = results_table(ResultStore(spec.out_dir).rows(), [t.key for t in spec.tasks])
        tables.append(table.sort_values("key").reset_index(drop=True))
        shutil.rmtree(spec.out_dir)
    assert (tables[0]["status"] == "ok").all()
    for other in tables[1:]:
        _assert_same_rows(tables[0], other)


def _assert_same_rows(one: pd.DataFrame, grouped: pd.DataFrame) -> None:
    """Same keys, statuses, flags, targets; numbers within 1e-5 (diagnostics 1e-4)."""
    assert list(one["key"]) == list(grouped["key"])
    for column in one.columns:
        if column in ("seconds", "key"):
            continue
        if column == "diagnostics":
            for a, b in zip(one[column], grouped[column], strict=True):
                if isinstance(a, str):
                    a, b = json.loads(a), json.loads(b)
                    assert a.keys() == b.keys()
                    for name in a:
                        assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), name
        elif column == "neighborhood_kl":
            # KL(P*||P) sums P* (log P* - log P) over the vocabulary: a difference of nearly
            # equal log-probabilities, so the v*'s rounding (1e-7) shows at ~2e-5 of it.
            np.testing.assert_allclose(grouped[column], one[column], rtol=1e-4, err_msg=column)
        elif one[column].dtype.kind == "f":
            np.testing.assert_allclose(grouped[column], one[column], rtol=1e-5, atol=1e-9,
                                       err_msg=column)
        else:
            assert list(grouped[column]) == list(one[column]), column


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D (in x out) and Linear weights
def test_edits_measured_together_equal_each_measured_in_place(family, tok, store):
    """G ROME/MEMIT edits of one fact measured in the same forwards through
    weight_deltas_by_group: every probe, the essence perplexity and the next-token
    distributions equal those of each edit written into the weights."""
    from locedit.data.records import FactRecord
    from locedit.editing.deltas import weight_deltas_by_group
    from locedit.metrics import neighborhood_kl as nkl
    from locedit.metrics.evaluation import (
        EssenceTexts,
        build_probes,
        copied_essence_perplexity,
        copied_probe_probabilities,
        essence_perplexity,
        probe_probabilities,
    )
    from locedit.models.noise import NoiseConfig

    model = editable_tiny_model(family, n_layers=4)
    record = FactRecord("f1", "Eiffel Tower", EIFFEL.prompt, "Paris", "Rome",
                        ("Where is the Eiffel Tower? It is in",), ("The Louvre is located in",))
    noise = NoiseConfig(0.5, 3, 0)
    probes = build_probes(tok, record, None, noised=True)
    essence = EssenceTexts(3, (tuple(tok("Eiffel Tower is a big tower")["input_ids"]),
                               tuple(tok("Eiffel Tower is a thing")["input_ids"])))
    prompts = nkl.kl_prompts(tok, record)
    rome, memit = hparams_for("rome", overrides=FAST), hparams_for(
        "memit", overrides={**FAST, "n_layers": 2})
    want, deltas = [], []
    for method, layer, hp in (("rome", 1, rome), ("rome", 2, rome), ("memit", 2, memit)):
        originals = {n: p.detach().clone() for n, p in model.named_parameters()}
        with edited(model, tok, method, EIFFEL, layer, hp, store) as result:
            want.append((probe_probabilities(model, probes, record, noise),
                         essence_perplexity(model, essence),
                         nkl.next_token_distributions(model, prompts, 2)))
            deltas.append({n: p.detach() - originals[n]
                           for n, p in model.named_parameters() if n in result.changed})
    with weight_deltas_by_group(model, deltas):
        posts = copied_probe_probabilities(model, probes, record, noise, 3)
        ppls = copied_essence_perplexity(model, essence, "continuation", 3)
        dists = nkl.copied_next_token_distributions(model, prompts, 2, 3)
    for (post, ppl, dist), got in zip(want, zip(posts, ppls, dists, strict=True), strict=True):
        assert got[0].keys() == post.keys()
        for key, value in post.items():
            assert got[0][key] == pytest.approx(value, rel=REL), key
        assert got[1] == pytest.approx(ppl, rel=REL)
        _close(got[2], dist)
    # and without the hooks the model is the unedited one
    assert copied_probe_probabilities(model, probes, record, noise, 1)[0] == probe_probabilities(
        model, probes, record, noise)


def test_measuring_together_holds_a_modules_change_only_for_the_edits_that_change_it(monkeypatch):
    """Three edits at layers 0, 1 and 1-2 (a MEMIT-like window): each module's stacked change
    holds the edits that change it (1, 2 and 1 of them), not all three (on GPT-J, MEMIT's
    dense float32 changes for every edit of a fact in every module of its windows would take
    tens of GB); each block of rows still sees its own edit, the others' none."""
    from locedit.editing.deltas import weight_deltas_by_group

    model = editable_tiny_model("llama", n_layers=3).double()
    names = [down_proj_name(model, layer) for layer in range(3)]  # the weights
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)

    def change(name):
        return 0.05 * torch.randn(params[name].shape, generator=generator, dtype=torch.float64)

    deltas = [{names[0]: change(names[0])}, {names[1]: change(names[1])},
              {names[1]: change(names[1]), names[2]: change(names[2])}]
    ids = torch.tensor([[5, 17, 42, 7, 99]], device="cpu")
    want = []
    for delta in deltas:
        originals = {name: params[name].detach().clone() for name in delta}
        with torch.no_grad():
            for name, value in delta.items():
                params[name].add_(value)
            want.append(model(input_ids=ids).logits[0])
            for name, value in originals.items():
                params[name].copy_(value)
    stacked, stack = [], torch.stack
    monkeypatch.setattr(torch, "stack", lambda t, *a, **k: stacked.append(len(t)) or stack(t, *a, **k))
    with weight_deltas_by_group(model, deltas), torch.no_grad():
        monkeypatch.setattr(torch, "stack", stack)
        got = model(input_ids=ids.repeat(3, 1)).logits
    assert sorted(stacked) == [1, 1, 2]
    for g in range(3):
        torch.testing.assert_close(got[g], want[g], rtol=1e-5, atol=1e-5)  # changes in float32
    assert (want[0] - want[1]).abs().max() > 1e-3  # the edits differ


def test_measuring_together_supports_linear_weights_only():
    from locedit.editing.deltas import weight_deltas_by_group

    model = editable_tiny_model("gpt2", n_layers=2)
    name, param = next((n, p) for n, p in model.named_parameters() if "ln_1" in n)
    with pytest.raises(ValueError, match="Linear and Conv1D modules, not of LayerNorm"):
        with weight_deltas_by_group(model, [{name: torch.zeros_like(param)}]):
            pass


def test_task_groups_keep_order_and_group_only_edits_of_one_method_and_problem():
    from locedit.sweep.plan import EditTask
    from locedit.sweep.worker import task_groups

    tasks = [EditTask("f1", layer, method, problem, "h")
             for method, problem in (("rome", "a"), ("rome", "b"), ("ft1", "a"), ("memit", "a"))
             for layer in (0, 1, 2)]
    groups = task_groups(tasks, 2)
    assert [t for g in groups for t in g] == tasks
    assert [(g[0].method, g[0].problem, len(g)) for g in groups] == [
        ("rome", "a", 2), ("rome", "a", 1), ("rome", "b", 2), ("rome", "b", 1),
        ("ft1", "a", 2), ("ft1", "a", 1), ("memit", "a", 2), ("memit", "a", 1),
    ]
    assert all(len(g) == 1 for g in task_groups(tasks, 1))


def test_group_size_setting():
    from locedit.editing.grouped import group_size_from, job_bytes

    model = editable_tiny_model("gpt2", n_layers=2)
    assert group_size_from(None, model) == 1  # CPU default
    assert group_size_from(8, model) == 8
    with pytest.raises(ValueError, match="group_size"):
        group_size_from(0, model)
    assert job_bytes(model) > 24 * 4 * model.config.vocab_size * 4  # the logits at least


def test_jobs_hold_enough_facts_for_a_group():
    """pending_jobs packs ``facts_per_job`` facts of one method into a job, in the plan's
    order, without the done tasks; facts_per_job fills a group of edit.group_size from each
    fact's layers (1 where edits run one at a time, as on a CPU with group_size null)."""
    from locedit.sweep.plan import EditTask
    from locedit.sweep.runner import facts_per_job, pending_jobs

    tasks = [EditTask(f, layer, method, problem, "h")
             for f in ("f1", "f2", "f3") for method in ("rome", "ft1")
             for problem in ("a", "b") for layer in (0, 1)]
    done = {t.key for t in tasks if t.fact_id == "f2" and t.method == "ft1"}
    jobs = pending_jobs(tasks, done, facts_per_job=2)
    assert list(jobs) == [("rome", ("f1", "f2")), ("ft1", ("f1", "f3")), ("rome", ("f3",))]
    assert jobs[("rome", ("f1", "f2"))] == [
        t for t in tasks if t.method == "rome" and t.fact_id in ("f1", "f2")
    ]
    assert sum(map(len, jobs.values())) == len(tasks) - len(done)
    assert list(pending_jobs(tasks, set())) == [
        (m, (f,)) for f in ("f1", "f2", "f3") for m in ("rome", "ft1")
    ]
    with pytest.raises(ValueError, match="facts_per_job"):
        pending_jobs(tasks, set(), 0)

    def per_job(size, device="cpu", ray_gpus=None):
        params = {"edit": {"group_size": size}, "model": {"device": device}}
        return facts_per_job(params, tasks, ray_gpus)

    assert [per_job(size) for size in (1, 2, 3, 4, 64)] == [1, 1, 2, 2, 32]
    assert per_job(None) == 1  # a CPU's default group is one edit
    # model.device=cuda: the workers' GPUs (up to 64 edits a group), whether or not the
    # driver (e.g. a Ray head node, or this test machine) has a GPU itself
    assert per_job(None, "cuda") == per_job(None, "cuda:1") == 32
    # model.device=auto on Ray: the GPUs the cluster gives the workers decide, not the driver's
    assert per_job(None, "auto", ray_gpus=2.0) == 32
    assert per_job(None, "auto", ray_gpus=0.0) == per_job(None, "cpu", ray_gpus=2.0) == 1


def test_run_facts_groups_across_facts_and_a_fact_that_cannot_be_prepared_fails_alone(
    tok, store, monkeypatch
):
    """Two facts' edits in groups of 3 (crossing from one fact to the next) give the rows of
    one edit at a time; a third fact whose pre-edit evaluation fails gives its failure rows
    and takes no place in a group; tasks of a fact not given are refused."""
    from locedit.data.records import FactRecord
    from locedit.models.noise import NoiseConfig
    from locedit.sweep.plan import EditTask
    from locedit.sweep.worker import EvaluationConfig, run_facts

    model = editable_tiny_model("gpt2", n_layers=3)
    facts = [
        FactRecord("f1", "Eiffel Tower", EIFFEL.prompt, "Paris", "Rome", (),
                   ("The Louvre is located in",)),
        FactRecord("f2", "Danielle Darrieux", DARRIEUX.prompt, "French", "English", (),
                   ("Jean Gabin speaks",)),
        FactRecord("f3", "Toko Yasuda", YASUDA.prompt, "guitar", "piano", (), ("Bob plays the",)),
    ]
    hp = hparams_for("rome", overrides=FAST)
    tasks = [EditTask(f.fact_id, layer, "rome", "error_injection", "h")
             for f in facts for layer in (0, 1)]
    config = EvaluationConfig(NoiseConfig(0.5, 2, 0), essence=False)
    prepare = sweep_worker._prepare_fact

    def broken_third(model, tokenizer, record, *args):
        if record.fact_id == "f3":
            raise ValueError("no subject in the prompt (simulated)")
        return prepare(model, tokenizer, record, *args)

    monkeypatch.setattr(sweep_worker, "_prepare_fact", broken_third)
    sizes = []

    def counted(model, tokenizer, edits, covariance):
        sizes.append(sorted((e.request.subject, e.layer) for e in edits))
        return optimise_together(model, tokenizer, edits, covariance)

    monkeypatch.setattr(sweep_worker, "optimise_together", counted)
    runs = []
    for size in (1, 3):
        rows: list[dict] = []
        run_facts(model, tok, store, facts, tasks, {("rome", "error_injection"): hp}, config,
                  rows.append, group_size=size)
        runs.append(pd.DataFrame(rows).drop(columns="seconds").sort_values("key"))
    assert sizes == [  # the first group crosses from f1 to f2
        [("Danielle Darrieux", 0), ("Eiffel Tower", 0), ("Eiffel Tower", 1)],
    ]
    one, grouped_rows = runs
    assert list(one.loc[one.fact_id == "f3", "status"]) == ["failed"] * 2
    assert one.loc[one.fact_id == "f3", "reason"].str.contains("simulated").all()
    assert (one.loc[one.fact_id != "f3", "status"] == "ok").all()
    _assert_same_rows(one.reset_index(drop=True), grouped_rows.reset_index(drop=True))
    with pytest.raises(ValueError, match="not given"):
        run_facts(model, tok, store, facts[:1], tasks, {("rome", "error_injection"): hp},
                  config, lambda row: None)


def test_a_group_whose_edits_all_fail_gives_the_sequential_failure_rows(tok, store):
    """Non-finite v* in every edit of a group: each row fails with the reason the sequential
    run gives, and nothing is measured."""
    from locedit.data.records import FactRecord
    from locedit.models.noise import NoiseConfig
    from locedit.sweep.plan import EditTask
    from locedit.sweep.worker import EvaluationConfig, run_facts

    model = editable_tiny_model("gpt2", n_layers=4)
    record = FactRecord("f1", "Eiffel Tower", EIFFEL.prompt, "Paris", "Rome", (),
                        ("The Louvre is located in",))
    broken = dataclasses.replace(  # past the hyperparameter checks, as a blow-up would be
        hparams_for("rome", overrides={**FAST, "v_lr": 1e37}), clamp_norm_factor=float("inf")
    )
    tasks = [EditTask("f1", layer, "rome", "error_injection", "h") for layer in (0, 1)]
    config = EvaluationConfig(NoiseConfig(0.5, 2, 0), essence=False)
    runs = []
    for size in (1, 2):
        rows: list[dict] = []
        run_facts(model, tok, store, [record], tasks, {("rome", "error_injection"): broken},
                 config, rows.append, group_size=size)
        runs.append(rows)
    assert [r["status"] for r in runs[1]] == ["failed", "failed"]
    assert [r["reason"] for r in runs[1]] == [r["reason"] for r in runs[0]]
    assert "non-finite v*" in runs[1][0]["reason"]


# Batched finetuning (FT-1, FT-5): edits that differ in layer and in fact, one batch.
FT_CASES = [(EIFFEL, 1), (EIFFEL, 3), (DARRIEUX, 2), (YASUDA, 4)]


def _ft_hparams(method, **overrides):
    # a ball wide enough, and a learning rate large enough, that a few steps move p(target)
    return hparams_for(method, overrides={"steps": 6, "lr": 2e-2, "linf_eps": 5e-2, **overrides})


def _edit_outcome(model, tok, method, request, layer, hp, given=()):
    """(weight changes, p(target), result) of one edit made in place, then restored."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with edited(model, tok, method, request, layer, hp, None, (), given) as result:
        changes = {n: p.detach() - before[n] for n, p in model.named_parameters() if n in result.changed}
        return changes, _p_target(model, tok, request), result


def _assert_same_edit(got, want):
    """p(target) and flags as the sequential edit's (p within 1e-5), diagnostics within 1e-4;
    the weight change within 1e-4 of its norm, but for at most 0.1% of its elements that
    differ by more than 1e-3 of the largest change. A batch of more rows rounds the forward
    differently (1e-7); where an element's gradient is that small, Adam's normalised step
    (at a learning rate that moves p(target) within a few steps) goes either way: a full
    step in the other direction for a handful of elements (measured: 1 of 8192 at most)."""
    (changes, p_got, r_got), (expected, p_want, r_want) = got, want
    assert sorted(changes) == sorted(expected) and expected
    for name in expected:
        diff = changes[name] - expected[name]
        flipped = diff.abs() > 1e-3 * float(expected[name].abs().max())
        assert int(flipped.sum()) <= 1e-3 * flipped.numel(), (name, int(flipped.sum()))
        _close(torch.where(flipped, expected[name], changes[name]), expected[name], rel=1e-4)
    assert p_got == pytest.approx(p_want, rel=REL)
    assert r_got.flags == r_want.flags
    for key, value in r_want.diagnostics.items():
        assert r_got.diagnostics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D (in x out) and Linear weights
@pytest.mark.parametrize("method", ["ft1", "ft5"])
def test_batched_finetuning_equals_sequential_edits(method, family, tok):
    """Every FT edit's weight change, p(target) and diagnostics from one batched run equal the
    editor's own run, with early stopping ending some edits and not others."""
    model = editable_tiny_model(family, n_layers=6)
    free = [_edit_outcome(model, tok, method, r, layer, _ft_hparams(method, early_stop_loss=None))
            for r, layer in FT_CASES]
    lasts = sorted(o[2].diagnostics["ft_loss_last"] for o in free)
    # a threshold between the edits' losses after 6 steps, given 10: the better ones stop at
    # step 6 or earlier, the rest run on (the losses fall about evenly, so they stop later)
    hp = _ft_hparams(method, early_stop_loss=(lasts[1] + lasts[2]) / 2, steps=10)
    want = [_edit_outcome(model, tok, method, r, layer, hp) for r, layer in FT_CASES]
    steps = [o[2].diagnostics["ft_steps"] for o in want]
    assert max(steps[i] for i in range(4) if free[i][2].diagnostics["ft_loss_last"] < lasts[2]) <= 6
    assert len(set(steps)) > 1, steps  # some edits stop while others go on
    given = optimise_together(model, tok, [GroupedEdit(method, r, layer, hp) for r, layer in FT_CASES])
    for (request, layer), outcome, expected in zip(FT_CASES, given, want, strict=True):
        assert len(outcome) == 1 and not isinstance(outcome[0], EditFailed)
        _assert_same_edit(_edit_outcome(model, tok, method, request, layer, hp, outcome), expected)


def test_a_finetuning_edit_that_blows_up_fails_alone(tok, monkeypatch):
    """Non-finite weights in one edit after its second step: that edit fails with the reason
    the sequential run gives such an edit; the others equal their own runs."""
    from locedit.editing import grouped_finetune

    model = editable_tiny_model("gpt2", n_layers=6)
    hp = _ft_hparams("ft1", early_stop_loss=None)
    want = [_edit_outcome(model, tok, "ft1", r, layer, hp) for r, layer in FT_CASES]
    project = grouped_finetune.GroupedFinetune.project_to_linf_ball
    calls = []

    def blow_up(self):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                for copy in self.edits[1].copies.values():
                    copy.fill_(float("nan"))
        project(self)

    monkeypatch.setattr(grouped_finetune.GroupedFinetune, "project_to_linf_ball", blow_up)
    given = optimise_together(model, tok, [GroupedEdit("ft1", r, layer, hp) for r, layer in FT_CASES])
    failed = given[1][0]
    assert isinstance(failed, EditFailed)
    assert "non-finite weights after an optimiser step" in str(failed)
    with pytest.raises(EditFailed, match="non-finite weights"):
        _edit_outcome(model, tok, "ft1", EIFFEL, 3, hp, given[1])
    for index in (0, 2, 3):
        request, layer = FT_CASES[index]
        _assert_same_edit(_edit_outcome(model, tok, "ft1", request, layer, hp, given[index]), want[index])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["ft1", "ft5"])
def test_batched_finetuning_of_half_precision_weights_equals_sequential_edits(method, family, tok):
    """bfloat16 weights train through float32 masters in a batch as one at a time. GPT-2's
    batched forward rounds as its single one, so the edits are equal as in float32; Llama's
    does not (bfloat16 keeps 3 significant digits, and a batch of another size sums in another
    order), so its p(target) agrees within 2e-3 (measured: 8e-4), its diagnostics within 1e-2
    and its weight changes' norms within 10% (Adam's normalised step turns the rounding of
    the smallest gradients into full steps either way, as in float32 but more often)."""
    model = editable_tiny_model(family, n_layers=6).to(torch.bfloat16)
    hp = _ft_hparams(method, early_stop_loss=None)
    want = [_edit_outcome(model, tok, method, r, layer, hp) for r, layer in FT_CASES]
    given = optimise_together(model, tok, [GroupedEdit(method, r, layer, hp) for r, layer in FT_CASES])
    for (request, layer), outcome, expected in zip(FT_CASES, given, want, strict=True):
        got = _edit_outcome(model, tok, method, request, layer, hp, outcome)
        if family == "gpt2":
            _assert_same_edit(got, expected)
            continue
        (changes, p_got, r_got), (changed, p_want, r_want) = got, expected
        assert p_got == pytest.approx(p_want, rel=2e-3)
        assert r_got.flags == r_want.flags
        for key, value in r_want.diagnostics.items():
            assert r_got.diagnostics[key] == pytest.approx(value, rel=1e-2, abs=1e-6), key
        for name, change in changed.items():
            assert float(changes[name].float().norm()) == pytest.approx(
                float(change.float().norm()), rel=0.1
            )


def test_half_precision_finetuning_steps_on_each_steps_own_gradient(tok, monkeypatch):
    """bfloat16 weights train through float32 masters; the optimiser zeroes only the masters,
    so each step must clear the weights' gradients itself, or every step would add the
    earlier steps' gradients to its own (found in the batched path's review)."""
    from locedit.editing import finetune

    model = editable_tiny_model("gpt2", n_layers=3).to(torch.bfloat16)
    step = finetune.ConstrainedFinetune.optimizer_step
    left = []

    def spy(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        left.append([p.grad is not None for p in self.trained])
        return step(self, epoch, batch_idx, optimizer, optimizer_closure)

    monkeypatch.setattr(finetune.ConstrainedFinetune, "optimizer_step", spy)
    with edited(model, tok, "ft1", EIFFEL, 1, _ft_hparams("ft1", early_stop_loss=None, steps=4)):
        pass
    assert len(left) == 4 and not any(any(flags) for flags in left)


def test_stacked_batches_keep_each_subjects_noise(tok):
    """Batches of subjects of different lengths, each with its own noise samples, stacked
    (finetuning several facts' Fact Forcing edits together): every row's hidden states equal
    its own batch's, its noise at its own subject tokens."""
    from locedit.editing.batch import build_batch
    from locedit.editing.forward import hidden_states
    from locedit.editing.grouped_finetune import stacked_batches

    model = editable_tiny_model("gpt2", n_layers=2)
    d = model.config.hidden_size
    batches = []
    for seed, request in enumerate((EIFFEL, DARRIEUX)):
        ids = encode_prompt(tok, request.prompt, request.subject)
        n_tokens = ids.subject_end - ids.subject_start
        noise = torch.randn(3, n_tokens, d, generator=torch.Generator().manual_seed(seed))
        noised = dataclasses.replace(request, subject_noise=noise)
        target = encode_target(tok, request.prompt, request.target)
        batches.append(build_batch(tok, noised, target, TEMPLATES, pad_id=0))
    lengths = {int(b.noise.shape[1]) for b in batches}
    assert len(lengths) == 2  # the padding is exercised
    stacked = stacked_batches(batches, pad_id=0)
    with torch.no_grad():
        together = hidden_states(model, stacked)
        first = 0
        for batch in batches:
            alone = hidden_states(model, batch)
            width = alone.shape[1]
            mask = batch.attention_mask.bool()
            torch.testing.assert_close(
                together[first : first + batch.size, :width][mask], alone[mask],
                rtol=1e-5, atol=1e-6,
            )
            first += batch.size
    clean = dataclasses.replace(batches[1], noise=None, noise_sample=(None,) * batches[1].size)
    with pytest.raises(ValueError, match="every edit or in none"):
        stacked_batches([batches[0], clean], pad_id=0)
