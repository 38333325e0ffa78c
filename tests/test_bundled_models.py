"""The real bundled models (slow: converts and loads Gemma-3-270M / SmolLM2-135M)."""

from __future__ import annotations

import pytest

from locedit.data.filter import greedy_completions, is_known
from locedit.data.loaders import load_known
from locedit.models import load_model, n_layers


@pytest.mark.slow
def test_gemma_completes_a_well_known_fact():
    model, tokenizer = load_model("gemma-3-270m")
    assert n_layers(model) == 18 and model.config.hidden_size == 640
    prompt = "The Eiffel Tower is located in the city of"
    (completion,) = greedy_completions(model, tokenizer, [prompt], max_new_tokens=8, progress=False)
    assert is_known(completion, "Paris"), completion


@pytest.mark.slow
def test_gemma_knows_some_facts_from_known_1000(shared_data):
    model, tokenizer = load_model("gemma-3-270m")
    records = load_known(shared_data).records[:16]
    completions = greedy_completions(model, tokenizer, [r.prompt for r in records], max_new_tokens=12, progress=False)
    known = [r.fact_id for r, c in zip(records, completions, strict=True) if is_known(c, r.target_true)]
    assert len(known) >= 4, known


@pytest.mark.slow
def test_smollm2_loads_with_the_llama_layout():
    model, _ = load_model("smollm2-135m")
    assert model.config.model_type == "llama" and n_layers(model) == 30


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m"])
def test_bundled_model_passes_the_checks_and_discovery_finds_its_table_entry(name):
    from locedit.models import ARCHITECTURES, arch_spec, discover_spec, validate_spec

    model, _ = load_model(name)  # runs the numerical checks once already
    table = ARCHITECTURES[model.config.model_type]
    assert arch_spec(model) is table and discover_spec(model) == table
    assert [c.name for c in validate_spec(model, table)][-1] == "rome-identity"
