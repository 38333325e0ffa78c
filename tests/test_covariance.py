"""Key second moments against a hand computation, the cache keys, the solver and the corpus."""

import logging

import numpy as np
import pytest
import torch

from locedit.editing import CorpusSpec, CovarianceSolver, CovarianceStore, SingularCovarianceError
from locedit.editing.corpus import generate_context_templates, sample_from_model
from locedit.editing.covariance import second_moments
from locedit.models.scoring import pad_right
from locedit.testing import gpt2_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def _gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _mlp_inputs(model, module, ids, mask):
    """The input of an MLP block (after its pre-norm), captured by a hook."""
    seen = {}

    def hook(_module, inputs, _output):
        seen.setdefault("x", inputs[0].detach())

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        model.base_model(input_ids=ids, attention_mask=mask)
    handle.remove()
    return seen["x"].double().numpy()


def test_second_moment_matches_hand_computed_gpt2_keys(tok):
    model = tiny_model("gpt2", n_layers=3)
    rows = [
        tok("The cat sat on the mat")["input_ids"],
        tok("Paris is big")["input_ids"],
        tok("Hello")["input_ids"],
    ]
    rows = [[tok.eos_token_id, *r] for r in rows]
    sums, count = second_moments(model, rows, [1, 2], batch_size=2, progress=False)
    ids, mask = pad_right(rows, 0)
    x = _mlp_inputs(model, model.transformer.h[1].mlp, ids, mask)
    fc = model.transformer.h[1].mlp.c_fc
    keys = _gelu_new(x @ fc.weight.double().numpy() + fc.bias.double().numpy())  # Conv1D: x W + b
    keep = mask.numpy().astype(bool)
    keep[:, 0] = False  # the BOS of every row is left out
    expected = keys[keep].T @ keys[keep]
    assert count == keep.sum() == sum(len(r) - 1 for r in rows)
    # The model computes keys in float32; accumulation is float64.
    np.testing.assert_allclose(sums[1].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert sums[1].dtype == torch.float64


def test_second_moment_matches_hand_computed_llama_keys(tok):
    model = tiny_model("llama", n_layers=2)
    rows = [[tok.eos_token_id, *tok("A short line of text")["input_ids"]]]
    sums, count = second_moments(model, rows, [0], progress=False)
    ids, mask = pad_right(rows, 0)
    mlp = model.model.layers[0].mlp
    x = _mlp_inputs(model, mlp, ids, mask)[0, 1:]
    gate = x @ mlp.gate_proj.weight.double().numpy().T
    up = x @ mlp.up_proj.weight.double().numpy().T
    keys = gate / (1.0 + np.exp(-gate)) * up  # silu(gate) * up: the down-projection's input
    np.testing.assert_allclose(sums[0].numpy(), keys.T @ keys, rtol=1e-5, atol=1e-6)
    assert count == len(rows[0]) - 1


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", n_layers=3)


def test_store_caches_by_model_corpus_layer_count_and_dtype(tmp_path, tok, model, monkeypatch):
    spec = CorpusSpec(n_samples=6, sample_length=12, batch_size=3)
    store = CovarianceStore(tmp_path, spec, tok)
    first = store.get(model, 1)
    path = store.path(model, 1)
    assert path.exists() and path.with_suffix(".json").exists()
    assert store.fingerprint(model) in str(path) and store.statistics_key(model) in str(path)
    assert path.name == "layer001.n6.float32.pt"
    # The mean of k k^T over the corpus tokens, recomputed by hand from the cached corpus.
    rows = store._corpus_rows(model)
    sums, count = second_moments(model, rows, [1], batch_size=3, progress=False)
    torch.testing.assert_close(first, (sums[1] / count).float().double())
    assert torch.allclose(first, first.T)

    import locedit.editing.covariance as covariance

    monkeypatch.setattr(covariance, "second_moments", lambda *a, **k: pytest.fail("recomputed"))
    again = CovarianceStore(tmp_path, spec, tok).get(model, 1)
    assert torch.equal(first, again)
    for other in (
        CorpusSpec(n_samples=5, sample_length=12),
        CorpusSpec(n_samples=6, sample_length=12, dtype="float64"),
        CorpusSpec(n_samples=6, sample_length=12, seed=1),
    ):
        assert CovarianceStore(tmp_path, other, tok).path(model, 1) != path
    assert store.path(tiny_model("gpt2", n_layers=3, seed=1), 1) != path


def test_a_dtype_copy_can_share_the_statistics_of_its_source(tmp_path, tok, model, monkeypatch):
    import copy

    import locedit.editing.covariance as covariance

    spec = CorpusSpec(n_samples=4, sample_length=8, batch_size=2)
    store = CovarianceStore(tmp_path, spec, tok)
    first = store.get(model, 1)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert store.path(half, 1) != store.path(model, 1)  # other weights, other key
    fresh = CovarianceStore(tmp_path, spec, tok)
    fresh.share_statistics(half, model)
    monkeypatch.setattr(covariance, "second_moments", lambda *a, **k: pytest.fail("recomputed"))
    assert fresh.path(half, 1) == store.path(model, 1)
    assert torch.equal(fresh.get(half, 1), first)


def test_missing_statistics_without_tokenizer_say_what_to_run(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="locedit run stats"):
        CovarianceStore(tmp_path).get(model, 0)


def test_text_file_corpus_is_keyed_by_content(tmp_path, tok, model):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The first line of text.\n\nA second line here.\nThird.\n")
    spec = CorpusSpec(kind="text_file", text_file=str(corpus), n_samples=3, sample_length=8)
    store = CovarianceStore(tmp_path / "stats", spec, tok)
    rows = store._corpus_rows(model)
    assert rows[0] == [tok.eos_token_id, *tok("The first line of text.")["input_ids"][:7]]
    assert len(rows) == 3
    first_id = spec.content_id()
    corpus.write_text("Something else entirely.\n")
    assert spec.content_id() != first_id
    with pytest.raises(ValueError, match="text_file"):
        CorpusSpec(kind="text_file")


def test_solver_matches_numpy_and_checks_residual():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 16, generator=generator, dtype=torch.float64)
    moment = keys.T @ keys / 200
    rhs = torch.randn(16, generator=generator, dtype=torch.float64)
    solver = CovarianceSolver(moment)
    assert solver.ridge == 0.0
    np.testing.assert_allclose(
        solver.solve(rhs).numpy(), np.linalg.solve(moment.numpy(), rhs.numpy()), rtol=1e-10
    )


def test_rank_deficient_covariance_gets_a_logged_ridge(caplog):
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 16, generator=generator, dtype=torch.float64)  # rank 5 < 16
    moment = keys.T @ keys / 5
    with caplog.at_level(logging.WARNING):
        solver = CovarianceSolver(moment)
    assert solver.ridge > 0 and "ridge" in caplog.text
    rhs = torch.randn(16, generator=generator, dtype=torch.float64)
    x = solver.solve(rhs)
    ridge = solver.ridge * torch.trace(moment) / 16
    np.testing.assert_allclose(
        ((moment + ridge * torch.eye(16, dtype=torch.float64)) @ x).numpy(), rhs.numpy(), atol=1e-8
    )
    with pytest.raises(SingularCovarianceError):
        CovarianceSolver(torch.full((4, 4), float("nan")))


def test_model_samples_are_seeded_and_leave_global_rng_alone(tok, model):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = sample_from_model(model, tok, 3, 5, seed=7)
    after = torch.rand(1)
    assert torch.equal(after, expected_next)
    assert first == sample_from_model(model, tok, 3, 5, seed=7)
    assert first != sample_from_model(model, tok, 3, 5, seed=8)
    assert all(len(row) == 5 for row in first)


def test_context_templates_start_from_bos_and_hold_no_special_text(tok, model):
    templates = generate_context_templates(model, tok, lengths=(3, 6), count=4, seed=0)
    assert templates[0] == "{}" and len(templates) == 9
    for template in templates[1:]:
        assert template.endswith(". {}") and template.count("{}") == 1
        assert tok.eos_token not in template
    assert templates == generate_context_templates(model, tok, lengths=(3, 6), count=4, seed=0)
