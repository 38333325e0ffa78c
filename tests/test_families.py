"""Every family of ``locedit.testing.ALL_FAMILIES``, as a tiny random model with GPT-2's
vocabulary: its structure is discovered (or read from the table, which discovery must
reproduce), passes the numerical checks, and traces, zeroes and edits with the same exactness
checks as the hand-written families (OPT's flattened MLP rows through its row adapter).
Structures locedit cannot trace or edit (mixture-of-experts, encoder-decoder) are refused in
one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locedit.data.records import FactRecord
from locedit.editing import EditRequest, edited, hparams_for
from locedit.editing.finetune import finetuned_param_names
from locedit.editing.memit import effective_mom2_weight
from locedit.models.architecture import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    arch_spec,
    as_out_in,
    component_module,
    down_proj_name,
    down_proj_weight,
    get_module,
    n_layers,
)
from locedit.models.discovery import (
    ArchitectureCheckError,
    discover_spec,
    spec_with_overrides,
    validate_spec,
)
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import encode_prompt, encode_target
from locedit.testing import ALL_FAMILIES, editable_tiny_model, tiny_model
from locedit.tracing import (
    encode_fact,
    trace_fact_many,
    trace_fact_reference,
    window_layers,
    zero_fact,
)
from locedit.tracing.patching import target_probs_from_logits

FACT = FactRecord("mid", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French")
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
FAST = {"n_context_templates": 2, "context_template_lengths": (4,), "v_steps": 10}
LAYERS = 4


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_discovered_spec_passes_the_checks_and_agrees_with_the_table(family):
    model = tiny_model(family, n_layers=LAYERS)
    spec = discover_spec(model)
    if family in ARCHITECTURES:
        assert spec == ARCHITECTURES[family]
    names = [check.name for check in validate_spec(model, spec)]
    assert names == ["layers", "mlp-output", "final-norm", "effect", "rome-identity"]
    assert all(not p.requires_grad for p in model.parameters())
    assert n_layers(model) == LAYERS


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_tracing_and_zeroing_are_exact(family, tok):
    model = tiny_model(family, n_layers=3, seed=1).double()
    args = {"sigma": 0.5, "seed": 3, "n_samples": 2}
    kinds = ("mlp", "attn", "resid")
    fast = trace_fact_many(model, tok, FACT, kinds=kinds, windows=(3,), **args)
    for result, kind in zip(fast, kinds, strict=True):
        ref = trace_fact_reference(model, tok, FACT, kind=kind, window=3, **args)
        np.testing.assert_allclose(result.p_restored, ref.p_restored, rtol=1e-9, atol=1e-300)
        assert result.p_clean == pytest.approx(ref.p_clean, rel=1e-9)
        np.testing.assert_allclose(result.effect, ref.effect, atol=1e-5)
        np.testing.assert_allclose(ref.effect[: ref.subject_start], 0.0, atol=1e-9)
        assert np.abs(ref.p_restored - ref.p_noised).max() > 0  # the restorations act

    inp = encode_fact(tok, FACT)
    zeroed = zero_fact(model, tok, FACT, kind="mlp", window=3)
    subject = list(range(inp.subject_start, inp.subject_end))
    for layer in (0, 2):
        p = _zeroed_by_hand(model, inp, window_layers(layer, 3, 3), subject)
        assert zeroed.p_zeroed[layer] == pytest.approx(p, rel=1e-9)
    assert np.abs(zeroed.effect).max() > 0


def _zeroed_by_hand(model, inp, layers, positions) -> float:
    """p(o_true) of a plain forward with the MLP outputs at ``positions`` zeroed in ``layers``."""

    def zero(_m, _i, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        hidden = hidden.clone()
        hidden.view(1, -1, hidden.shape[-1])[:, positions] = 0.0  # OPT's MLP sees [seq, d]
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    handles = [component_module(model, "mlp", j).register_forward_hook(zero) for j in layers]
    try:
        with torch.no_grad():
            logits = model(input_ids=inp.ids()).logits
    finally:
        for handle in handles:
            handle.remove()
    return float(target_probs_from_logits(logits[:, inp.target_positions], inp.target_ids)[0])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_rome_memit_and_ft1_edit_exactly_what_they_should(
    family, tok, store, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    model = editable_tiny_model(family, n_layers=LAYERS)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    request = EditRequest(PROMPT, SUBJECT, "Rome")
    ids = encode_prompt(tok, PROMPT, SUBJECT).input_ids
    target = encode_target(tok, PROMPT, "Rome")

    def p_target() -> float:
        return target_log_probs(model, [ids], [target]).exp().item()

    before = p_target()
    layer = 1
    hp = hparams_for("rome", overrides=FAST)
    with edited(model, tok, "rome", request, layer, hp, store) as result:
        k_star, v_now = _key_and_value(model, tok, layer)
        down = get_module(model, arch_spec(model).mlp_down.format(layer))
        weight = as_out_in(model, down.weight).double()
        bias = down.bias.double() if getattr(down, "bias", None) is not None else 0.0
        v_star = result.tensors["v_star"].double()
        torch.testing.assert_close(weight @ k_star + bias, v_star, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v_now, v_star, rtol=1e-4, atol=1e-5)
        update = weight - as_out_in(model, originals[down_proj_name(model, layer)]).double()
        singular = torch.linalg.svdvals(update)
        assert singular[0] > 0 and singular[1] / singular[0] < 1e-5
        assert result.changed == [down_proj_name(model, layer)]
        after_rome = p_target()
    _assert_restored(model, originals)

    hp = hparams_for("memit", overrides=FAST)
    with edited(model, tok, "memit", request, 2, hp, store) as result:
        changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, originals[n]))
        assert changed == sorted(down_proj_name(model, j) for j in result.layers)
        assert result.layers == [0, 1, 2, 3]
        for j in result.layers:
            delta = (
                as_out_in(model, down_proj_weight(model, j).detach())
                - as_out_in(model, originals[down_proj_name(model, j)])
            ).double()
            _, singular, right = torch.linalg.svd(delta)
            assert singular[1] / singular[0] < 1e-5  # rank one
            # Its input direction is (lambda C + k k^T)^-1 k, solved independently in numpy.
            k = result.tensors[f"k_l{j}"].double().numpy()
            c = store.get(model, j).numpy()
            # A singular covariance (OPT's ReLU leaves dead units) is solved with the ridge the
            # solver logged, relative to the mean eigenvalue.
            ridge = result.diagnostics[f"covariance_ridge_l{j}"]
            c = c + ridge * np.trace(c) / c.shape[0] * np.eye(c.shape[0])
            lam = effective_mom2_weight(hp, int(c.shape[0]))
            adjusted = np.linalg.solve(lam * c + np.outer(k, k), k)
            cosine = abs(right[0].numpy() @ adjusted) / np.linalg.norm(adjusted)
            assert cosine == pytest.approx(1.0, abs=1e-5)
    _assert_restored(model, originals)

    eps = 1e-2
    hp = hparams_for("ft1", overrides={"linf_eps": eps, "steps": 10})
    with edited(model, tok, "ft1", request, layer, hp) as result:
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, originals[n])}
        assert changed == set(result.changed) == set(finetuned_param_names(model, [layer]))
        worst = max(
            float((dict(model.named_parameters())[n].double() - originals[n].double()).abs().max())
            for n in changed
        )
        assert 0 < worst <= eps
        after_ft = p_target()
    _assert_restored(model, originals)
    assert after_rome > before and after_ft > before


def _key_and_value(model, tok, layer):
    """Down-projection input and output at the subject's last token, from a plain forward."""
    enc = encode_prompt(tok, PROMPT, SUBJECT)
    module = get_module(model, arch_spec(model).mlp_down.format(layer))
    seen = {}

    def hook(_m, inputs, output):
        width = inputs[0].shape[-1]
        seen["k"] = inputs[0].reshape(1, -1, width)[0, enc.last_subject_index].detach().double()
        seen["v"] = output.reshape(1, -1, output.shape[-1])[0, enc.last_subject_index].double()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(torch.tensor([enc.input_ids]))
    finally:
        handle.remove()
    return seen["k"], seen["v"]


def _assert_restored(model, originals):
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name]), name


@pytest.mark.parametrize(
    ("family", "reason"),
    [
        ("mixtral", "mixture-of-experts"),
        ("qwen2_moe", "mixture-of-experts"),
        ("olmoe", "mixture-of-experts"),
        ("bart", "encoder-decoder"),
    ],
)
def test_unsupported_structures_are_refused_in_one_line(family, reason):
    model = tiny_model(family, n_layers=2)
    with pytest.raises(UnsupportedArchitectureError) as err:
        arch_spec(model)
    message = str(err.value)
    assert reason in message and family in message and "\n" not in message


def test_a_wrong_override_fails_the_named_check_with_how_to_fix():
    model = tiny_model("llama", n_layers=2)
    table = ARCHITECTURES["llama"]
    cases = {
        "mlp-output": {"mlp_down": "model.layers.{}.mlp.up_proj"},
        "rome-identity": {"down_orientation": "in_out"},
        "final-norm": {"final_norm": "model.layers.1.input_layernorm"},
        "paths": {"attn": "model.layers.{}.attention"},
    }
    for check, override in cases.items():
        with pytest.raises(ArchitectureCheckError) as err:
            validate_spec(model, spec_with_overrides(table, override))
        message = str(err.value)
        assert f"check '{check}'" in message and "model.arch" in message and "ArchSpec" in message
    fresh = tiny_model("llama", n_layers=2).state_dict()
    assert all(torch.equal(p, fresh[name]) for name, p in model.state_dict().items())


def test_load_model_applies_model_arch_settings(tmp_path):
    from locedit.models.loading import load_model
    from locedit.testing import save_tiny

    folder = save_tiny(tmp_path / "m", "qwen3", n_layers=2)
    model, _ = load_model(str(folder))
    assert arch_spec(model) == discover_spec(tiny_model("qwen3", n_layers=2))
    with pytest.raises(ArchitectureCheckError, match="check 'mlp-output'"):
        load_model(str(folder), arch={"mlp_down": "model.layers.{}.mlp.gate_proj"})

    from omegaconf import OmegaConf

    from locedit.pipeline.common import model_from_params

    arch = {"mlp_down": "model.layers.{}.mlp.up_proj", "mlp_post_norm": None}
    params = OmegaConf.create({"model": {"name": str(folder), "arch": arch}})
    with pytest.raises(ArchitectureCheckError, match="check 'mlp-output'"):
        model_from_params(params)


def test_models_check_prints_the_spec_and_every_check(tmp_path, capsys):
    from locedit.cli import main
    from locedit.testing import save_tiny

    folder = save_tiny(tmp_path / "m", "phi3", n_layers=2)
    assert main(["models", "--check", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "model_type 'phi3', spec discovered" in out
    assert "model.layers.{}.mlp.down_proj" in out and "all checks passed" in out
    for check in ("layers", "mlp-output", "final-norm", "effect", "rome-identity"):
        assert f"check {check}" in out
    wrong = [
        "models",
        "--check",
        str(folder),
        "--arch",
        "final_norm=model.layers.0.input_layernorm",
    ]
    assert main(wrong) == 2
    assert main(["models"]) == 0
    assert "discovered" in capsys.readouterr().out


def test_opt_row_adapter_changes_names_not_numbers():
    """OPT runs its MLP on [batch * position, width] rows; discovery wraps the down-projection
    so hooks see positions. Logits and gradients are bit-identical to the unadapted model's."""
    plain = tiny_model("opt", n_layers=2, seed=3)
    adapted = tiny_model("opt", n_layers=2, seed=3)
    spec = arch_spec(adapted)
    assert spec.mlp == spec.mlp_down == "model.decoder.layers.{}.fc2.linear"
    ids = torch.tensor([[464, 3139, 286, 4881, 318], [15, 16, 17, 18, 19]])
    torch.testing.assert_close(adapted(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    grads = []
    for model, name in ((plain, "fc2"), (adapted, "fc2.linear")):
        weight = model.get_submodule(f"model.decoder.layers.1.{name}").weight
        weight.requires_grad_(True)
        model(input_ids=ids).logits[:, -1, 42].sum().backward()
        grads.append(weight.grad.clone())
        weight.requires_grad_(False)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # the MLP hook sees [batch, position, width]
    mlp = adapted.get_submodule("model.decoder.layers.0.fc2.linear")
    seen = {}
    handle = mlp.register_forward_hook(lambda _m, _i, out: seen.update(shape=out.shape))
    try:
        adapted(input_ids=ids)
    finally:
        handle.remove()
    assert tuple(seen["shape"]) == (2, 5, 64)
