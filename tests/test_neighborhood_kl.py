"""Neighbourhood KL (CounterFact+, Hoelscher-Obermaier et al. 2023): the KL against a hand
computation, zero for an unedited model, once-per-fact pre-edit distributions, and an option
that leaves rows and keys alone when off."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from locedit.data.records import FactRecord, write_records
from locedit.metrics import neighborhood_kl as nkl
from locedit.pipeline import edit as edit_stage
from locedit.pipeline.common import compose_params
from locedit.sweep import ResultStore, results_table, run_sweep
from locedit.testing import editable_tiny_model, gpt2_tokenizer, save_tiny

FACT = FactRecord(
    "f1",
    "Eiffel Tower",
    "The Eiffel Tower is located in",
    "Paris",
    "Rome",
    ("Where is the Eiffel Tower? It is in",),
    ("The Louvre is located in", "Notre-Dame de Paris, which is located in the city of"),
)
FACTS = [
    FACT,
    FactRecord(
        "f2",
        "Danielle Darrieux",
        "Danielle Darrieux speaks",
        "French",
        "English",
        ("The language of Danielle Darrieux is",),
        ("Michel Rocard speaks",),
    ),
]


def _hand_log_probs(model, ids) -> torch.Tensor:
    """log-softmax of a plain forward's last logits, in float64 (no locedit code)."""
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0, -1].double()
    return torch.log_softmax(logits, dim=-1)


def _perturbed(model, scale: float = 0.02, seed: int = 1):
    """A copy of ``model`` with one MLP weight moved a little (an edit's stand-in)."""
    import copy

    other = copy.deepcopy(model)
    weight = other.transformer.h[1].mlp.c_proj.weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=generator) * scale)
    return other


def test_prompts_prepend_the_edit_as_counterfact_plus():
    tokenizer = gpt2_tokenizer()
    prompts = nkl.kl_prompts(tokenizer, FACT, "edit")
    expected = "The Eiffel Tower is located in Rome. The Louvre is located in"
    assert prompts[0] == tuple(tokenizer(expected)["input_ids"])
    assert nkl.kl_prompts(tokenizer, FACT, "none")[1] == tuple(
        tokenizer(FACT.neighborhood_prompts[1])["input_ids"]
    )
    no_new = FactRecord(
        "x", "Eiffel Tower", "The Eiffel Tower is located in", "Paris", None, (), ("a b",)
    )
    assert nkl.kl_prompts(tokenizer, no_new, "edit") == []


@pytest.mark.parametrize("direction", nkl.DIRECTIONS)
@pytest.mark.parametrize("reduction", nkl.REDUCTIONS)
def test_kl_matches_a_hand_computation(direction, reduction):
    tokenizer = gpt2_tokenizer()
    pre_model = editable_tiny_model("gpt2", n_layers=3)
    post_model = _perturbed(pre_model)
    prompts = nkl.kl_prompts(tokenizer, FACT, "edit")
    assert len({len(p) for p in prompts}) == 2  # padding is exercised
    config = nkl.NeighborhoodKLConfig(enabled=True, direction=direction, reduction=reduction)
    metric = nkl.neighborhood_kl(
        nkl.next_token_distributions(pre_model, prompts),
        nkl.next_token_distributions(post_model, prompts),
        config,
    )
    by_hand = []
    for ids in prompts:
        log_p, log_q = _hand_log_probs(pre_model, ids), _hand_log_probs(post_model, ids)
        if direction == "post_pre":
            log_p, log_q = log_q, log_p  # KL(P_post || P_pre): the authors' code
        kl = float((log_p.exp() * (log_p - log_q)).sum())
        by_hand.append(kl / log_p.numel() if reduction == "vocab_mean" else kl)
    expected = sum(by_hand) / len(by_hand)
    assert expected > 0
    # float32 log-softmax (ours) vs float64 (by hand): about 4e-7 apart in nats
    scale = pre_model.config.vocab_size if reduction == "vocab_mean" else 1
    assert metric == pytest.approx(expected, rel=0, abs=1e-6 / scale)


def test_unedited_model_has_zero_kl_and_float64_sums():
    tokenizer = gpt2_tokenizer()
    model = editable_tiny_model("gpt2", n_layers=3).to(torch.bfloat16)
    prompts = nkl.kl_prompts(tokenizer, FACT, "edit")
    pre = nkl.next_token_distributions(model, prompts)
    assert pre.dtype == torch.float32
    assert nkl.kl_divergences(pre, pre).dtype == torch.float64
    assert (
        nkl.neighborhood_kl(
            pre, nkl.next_token_distributions(model, prompts), nkl.NeighborhoodKLConfig()
        )
        == 0.0
    )
    assert math.isnan(
        nkl.neighborhood_kl(torch.empty(0, 0), torch.empty(0, 0), nkl.NeighborhoodKLConfig())
    )


def test_settings_are_checked():
    with pytest.raises(ValueError, match="direction"):
        nkl.NeighborhoodKLConfig(direction="forward")
    with pytest.raises(ValueError, match="prefix"):
        nkl.NeighborhoodKLConfig.from_mapping({"prefix": "rewrite"})


def _params(tmp_path, name: str, kl: bool | None):
    model_dir = tmp_path / "tiny"
    if not model_dir.exists():
        save_tiny(model_dir, "gpt2", n_layers=3)
    outputs = tmp_path / name
    params = compose_params(
        "conf",
        [
            f"model.name={model_dir}",
            f"paths.outputs={outputs}", f"paths.reports={outputs}/reports",
            "edit.methods=[ft1]",
            "edit.problems=[error_injection]",
            "edit.layers=[0,2]",
            "edit.threads=1",
            "edit.essence.enabled=false",
            "trace.noise_sigma=0.5",
            "trace.noise_samples=3",
            "method.ft.steps=3",
            "method.ft.linf_eps=0.05",
        ],
    )
    plain = OmegaConf.to_container(params)
    if kl is None:
        del plain["edit"]["neighborhood_kl"]  # a config from before the option existed
    else:
        plain["edit"]["neighborhood_kl"]["enabled"] = kl
    write_records(outputs / "filter" / "facts.jsonl", FACTS)
    return OmegaConf.create(plain)


def test_sweep_rows_carry_the_kl_and_reuse_pre_edit_distributions(tmp_path, monkeypatch):
    calls: list[int] = []
    original = nkl.next_token_distributions

    def counting(model, prompts, batch_size=16):
        calls.append(len(prompts))
        return original(model, prompts, batch_size)

    monkeypatch.setattr(nkl, "next_token_distributions", counting)
    spec = edit_stage.build_spec(_params(tmp_path, "on", True))
    assert run_sweep(spec, progress=False) == 4
    table = edit_stage.with_optional_columns(results_table(ResultStore(spec.out_dir).rows()))
    ok = table[table.status == "ok"]
    assert len(ok) == 4, table[["reason"]].to_string()
    assert (ok["neighborhood_kl"] > 0).all() and ok["neighborhood_kl"].map(math.isfinite).all()
    # one pre-edit forward per fact (2 facts) and one per edit (4 edits)
    assert len(calls) == 2 + 4
    cached = sorted(p.name for p in (spec.out_dir / "pre").glob("*-nkl-*.pt"))
    assert [name.split("-")[0] for name in cached] == ["f1", "f2"]

    # a rerun of the edits reads the pre-edit distributions from the cache: no new pre forward
    calls.clear()
    for path in (spec.out_dir / "rows").glob("*.jsonl"):
        path.unlink()
    assert run_sweep(spec, progress=False) == 4
    assert len(calls) == 4
    again = edit_stage.with_optional_columns(results_table(ResultStore(spec.out_dir).rows()))
    assert list(again["neighborhood_kl"]) == list(table["neighborhood_kl"])


def test_option_off_leaves_rows_and_keys_unchanged(tmp_path):
    absent = edit_stage.build_spec(_params(tmp_path, "absent", None))
    off = edit_stage.build_spec(_params(tmp_path, "off", False))
    on = edit_stage.build_spec(_params(tmp_path, "on", True))
    assert [t.key for t in off.tasks] == [t.key for t in absent.tasks]
    assert not {t.key for t in on.tasks} & {t.key for t in off.tasks}  # never reused across

    run_sweep(absent, progress=False)
    run_sweep(off, progress=False)
    strip = ("seconds", "diagnostics")
    rows_absent = [
        {k: v for k, v in r.items() if k not in strip} for r in ResultStore(absent.out_dir).rows()
    ]
    rows_off = [
        {k: v for k, v in r.items() if k not in strip} for r in ResultStore(off.out_dir).rows()
    ]
    assert rows_off == rows_absent
    assert not any("neighborhood_kl" in r for r in rows_off)
    assert not list((off.out_dir / "pre").glob("*-nkl-*"))
    table = edit_stage.with_optional_columns(results_table(ResultStore(off.out_dir).rows()))
    assert table["neighborhood_kl"].isna().all()


def _synthetic_analysis(with_kl: bool):
    import numpy as np

    from locedit.analysis import AnalysisConfig, analyze
    from locedit.analysis.synthetic import synthetic_effects, synthetic_results

    effects = synthetic_effects(n_facts=8, n_model_layers=6, windows=(5,), seed=1)
    results = synthetic_results(effects, (1, 4), methods=("rome", "ft1"), seed=2)
    if with_kl:
        rng = np.random.default_rng(0)
        results["neighborhood_kl"] = rng.uniform(0.0, 0.5, len(results))
    else:
        results["neighborhood_kl"] = float("nan")
    config = AnalysisConfig(bootstrap_samples=0, variants=(), mixed_effects=False)
    return analyze(effects, results, config), results


def test_analysis_reports_the_kl_beside_the_neighbourhood_score():
    from locedit.analysis import mlflow_metrics
    from locedit.analysis.tables import all_tables

    an, results = _synthetic_analysis(with_kl=True)
    tables, _ = all_tables(an)
    table = next(t for t in tables if t.name == "neighborhood_kl")
    ok = results[(results.status == "ok") & (results.method == "rome") & (results.layer == 4)]
    row = table.frame[(table.frame["Method"] == "ROME (1 layer)") & (table.frame["Layer"] == 4)]
    assert float(row["Neighborhood KL (lower better)"].iloc[0]) == pytest.approx(
        ok.neighborhood_kl.mean()
    )
    assert float(row["Neighborhood Score (higher better)"].iloc[0]) == pytest.approx(
        ok.neighborhood_score.mean()
    )
    assert "Neighborhood KL" in table.to_markdown()
    metrics = mlflow_metrics(an)
    ok_rome = results[(results.status == "ok") & (results.method == "rome")]
    key = f"specificity.{an.main_dataset}.error_injection.rome.neighborhood_kl"
    assert metrics[key] == pytest.approx(ok_rome.neighborhood_kl.mean())
    # the KL is never regressed (analysis.metrics holds scores only)
    assert "neighborhood_kl" not in set(an.regressions["metric"])


def test_analysis_without_kl_skips_its_table_with_a_note():
    from locedit.analysis import mlflow_metrics
    from locedit.analysis.tables import all_tables

    an, _ = _synthetic_analysis(with_kl=False)
    tables, notes = all_tables(an)
    assert all(t.name != "neighborhood_kl" for t in tables)
    assert any(n.startswith("Neighbourhood KL table skipped") for n in notes)
    assert not any(k.startswith("specificity.") for k in mlflow_metrics(an))
