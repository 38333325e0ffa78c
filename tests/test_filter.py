"""The known-fact filter keeps a fact exactly when o_true is within the first 36 greedy tokens."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from locedit.data.filter import FilterConfig, filter_known_facts, greedy_completions
from locedit.data.records import FactRecord
from locedit.testing import gpt2_tokenizer, tiny_model

WORDS = (
    "apple banana cherry delta echo fox golf hotel uniform whiskey red blue green yellow black "
    "white brown orange purple silver gold iron copper one two three four five six seven eight "
    "nine ten dog cat horse cow bird fish"
).split()


def _chain_model(tokenizer, chain_ids):
    """GPT-2 whose greedy continuation of token chain[i] is chain[i + 1], whatever came before.

    Attention and MLP outputs are zeroed, so the final hidden state depends on the current token
    only; the unembedding row of chain[i + 1] points along that state.
    """
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=64, n_head=4, n_positions=128, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        block = model.transformer.h[0]
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        model.lm_head.weight.zero_()
        for current, following in zip(chain_ids, chain_ids[1:], strict=False):
            state = model.transformer.ln_f(model.transformer.wte.weight[current])
            model.lm_head.weight[following] = 10 * state / state.norm()
    return model


def test_fact_kept_exactly_when_o_true_is_within_36_tokens():
    tokenizer = gpt2_tokenizer()
    chain_words = [" is"] + [f" {w}" for w in WORDS]
    chain = [tokenizer(w)["input_ids"] for w in chain_words]
    assert all(len(ids) == 1 for ids in chain), "every chain word must be one GPT-2 token"
    model = _chain_model(tokenizer, [ids[0] for ids in chain])
    completion = greedy_completions(model, tokenizer, ["Alice is"], max_new_tokens=36, progress=False)[0]
    assert completion == "".join(chain_words[1:37])

    def fact(i, target):
        return FactRecord(f"f{i}", "Alice", "Alice is", target, "zzz")

    records = [fact(0, WORDS[0]), fact(1, WORDS[35]), fact(2, WORDS[36]), fact(3, "Paris")]
    result = filter_known_facts(model, tokenizer, records, FilterConfig(batch_size=3), progress=False)
    assert [r.fact_id for r in result.kept] == ["f0", "f1"]
    assert result.n_known == 2
    assert result.dropped["o_true not in the greedy completion"] == 2
    assert result.completion_accuracy == 0.5

    # With max_facts the scan stops after the batch that filled it: f3..f5 are never generated.
    more = records + [fact(4, WORDS[1]), fact(5, WORDS[2])]
    calls = []
    original = model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or original(**kw)
    capped = filter_known_facts(
        model, tokenizer, more, FilterConfig(batch_size=2, max_facts=1), progress=False
    )
    assert [r.fact_id for r in capped.kept] == ["f0"]
    assert capped.n_scanned == 2 and calls == [2]
    assert capped.dropped["beyond max_facts"] == 1
    assert capped.dropped["not scanned (max_facts reached)"] == 4


def test_batched_left_padded_generation_equals_one_by_one():
    tokenizer = gpt2_tokenizer()
    model = tiny_model("gpt2", n_layers=2, seed=3)
    prompts = ["The Eiffel Tower is in", "Paris", "Toko Yasuda plays the instrument called the"]
    batched = greedy_completions(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, progress=False)
    single = [greedy_completions(model, tokenizer, [p], max_new_tokens=8, progress=False)[0] for p in prompts]
    assert batched == single


def test_erasure_flag_and_probability_are_stored():
    tokenizer = gpt2_tokenizer()
    chain = [tokenizer(w)["input_ids"][0] for w in (" is", " apple", " banana")]
    model = _chain_model(tokenizer, chain)
    record = FactRecord("f", "Alice", "Alice is", "apple", "pear")
    result = filter_known_facts(model, tokenizer, [record], FilterConfig(max_new_tokens=2), progress=False)
    (kept,) = result.kept
    p_true = kept.extra["p_true"]
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer("Alice is")["input_ids"]])).logits[0, -1]
    assert abs(p_true - torch.softmax(logits, -1)[chain[1]].item()) < 1e-5
    assert kept.extra["erasure_ok"] == (p_true >= 0.02)

    # min_p_true drops the known fact exactly when its probability is below the threshold.
    for threshold, n_kept in ((p_true * 0.99, 1), (p_true * 1.01, 0)):
        config = FilterConfig(max_new_tokens=2, min_p_true=threshold)
        filtered = filter_known_facts(model, tokenizer, [record], config, progress=False)
        assert len(filtered.kept) == n_kept
        assert filtered.dropped["p(o_true) below min_p_true"] == 1 - n_kept


def test_untokenisable_facts_are_dropped_with_a_reason():
    tokenizer = gpt2_tokenizer()
    model = tiny_model("gpt2", n_layers=1)
    records = [FactRecord("bad", "Bob", "Bob is", "x", " ")]
    result = filter_known_facts(model, tokenizer, records, FilterConfig(max_new_tokens=2), progress=False)
    assert result.kept == [] and sum(result.dropped.values()) == 1
    assert next(iter(result.dropped)).startswith("tokenization")


def test_filter_stage_reads_an_identical_scan_from_its_cache(tmp_path, monkeypatch):
    """A rerun with nothing changed reads the kept scan instead of generating again (a resumed
    `make scale`); a changed setting scans again."""
    from e2e_support import tiny_params

    from locedit.pipeline import filter as filter_stage
    from locedit.pipeline import prepare

    params = tiny_params(tmp_path, "default", [])
    prepare.run(params)
    filter_stage.run(params)
    facts = tmp_path / "outputs" / "filter" / "facts.jsonl"
    first = facts.read_text()
    report = (facts.parent / "report.json").read_text()
    scans = []

    def counted(*args, **kwargs):
        scans.append(1)
        return filter_known_facts(*args, **kwargs)

    monkeypatch.setattr(filter_stage, "filter_known_facts", counted)
    facts.unlink()
    filter_stage.run(params)
    assert scans == [] and facts.read_text() == first
    assert (facts.parent / "report.json").read_text() == report
    params.data.filter.max_new_tokens = int(params.data.filter.max_new_tokens) - 1
    filter_stage.run(params)
    assert scans == [1]
