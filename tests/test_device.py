"""Devices and precision: the settings, GPUs per worker, the implicit-device guard over every
path a stage runs, bit-exact snapshots in every dtype, and CPU vs CUDA agreement.

Tests marked ``device`` take a ``device`` argument; on a machine without CUDA the ``cuda``
half is skipped and the ``cpu`` half runs (``make gpu-check`` runs them on the GPU).
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import locedit
from locedit.data.filter import greedy_completions
from locedit.data.records import FactRecord
from locedit.editing import CorpusSpec, CovarianceStore, EditRequest, edited, hparams_for
from locedit.editing.methods import REGISTRY
from locedit.metrics.evaluation import build_probes, probe_probabilities, sample_essence_texts
from locedit.models.architecture import down_proj_weight
from locedit.models.device import (
    FACTORIES,
    ImplicitDeviceError,
    assign_gpus,
    implicit_device_guard,
    lightning_devices,
    parse_dtype,
    resolve_device,
    visible_gpus,
)
from locedit.models.noise import NoiseConfig
from locedit.models.snapshot import WeightSnapshot, same_bits
from locedit.testing import editable_tiny_model, tiny_model
from locedit.tracing import trace_fact_many, trace_fact_reference, zero_fact

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]
FAST = {"n_context_templates": 2, "context_template_lengths": (4,), "v_steps": 5}
FACT = FactRecord(
    "eiffel", "The Eiffel Tower", "The Eiffel Tower is located in the city of", "Paris", "Rome",
    paraphrase_prompts=("Where is the Eiffel Tower? In the city of",),
    neighborhood_prompts=("The Louvre is located in the city of",),
)
REQUEST = EditRequest(FACT.prompt, FACT.subject, "Rome")
TEMPLATES = ["{}", "Yesterday I read. {}"]


# ---------------------------------------------------------------------------- settings


def test_device_and_dtype_settings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(ValueError, match="unknown model.device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="model.dtype"):
        parse_dtype("int8")
    assert lightning_devices(torch.device("cpu")) == ("cpu", 1)
    assert lightning_devices(torch.device("cuda", 1)) == ("gpu", [1])


def test_gpu_assignment_for_workers():
    assert assign_gpus(3, []) == [None, None, None]
    assert assign_gpus(2, ["0", "1"]) == ["0", "1"]
    assert assign_gpus(4, ["0", "1"]) == ["0", "1", "0", "1"]  # surplus workers share
    assert assign_gpus(2, ["0", "1", "2", "3"], per_worker=2) == ["0,1", "2,3"]
    assert assign_gpus(4, ["3", "5"], per_worker=0.5) == ["3", "5", "3", "5"]
    assert assign_gpus(0, ["0"]) == []
    with pytest.raises(ValueError, match="only 1 GPUs"):
        assign_gpus(1, ["0"], per_worker=2)
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({}, count=2) == ["0", "1"]


def test_local_workers_spread_over_gpus_only_when_the_device_allows(monkeypatch):
    from locedit.sweep.runner import worker_gpu_plan

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert worker_gpu_plan({"model": {"device": "auto"}}, 3) == ["4", "5", "4"]
    assert worker_gpu_plan({"model": {"device": "cuda"}}, 1, 2) == ["4,5"]
    assert worker_gpu_plan({"model": {"device": "cuda:1"}}, 2) == [None, None]
    assert worker_gpu_plan({"model": {"device": "cpu"}}, 2) == [None, None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert worker_gpu_plan({"model": {"device": "auto"}}, 2) == [None, None]


# ------------------------------------------------------------------------------- guard


@pytest.fixture(scope="module")
def stats(tmp_path_factory, tok):
    return CovarianceStore(
        tmp_path_factory.mktemp("stats"), CorpusSpec(n_samples=8, sample_length=16), tok
    )


def run_every_path(model, tok, stats):
    """Tracing (fast, reference, zeroing), ROME, MEMIT, FT-1, the metric probes, essence
    sampling and the filter's greedy generation, on whatever device the model is."""
    trace_fact_many(model, tok, FACT, sigma=0.5, kinds=("mlp", "resid"), windows=(3,), n_samples=2)
    trace_fact_reference(model, tok, FACT, sigma=0.5, window=3, n_samples=2)
    zero_fact(model, tok, FACT, window=3)
    for method in ("rome", "memit", "ft1"):
        hp = hparams_for(method, overrides=FAST if method != "ft1" else {"steps": 3})
        with edited(model, tok, method, REQUEST, 1, hp, stats):
            probes = build_probes(tok, FACT, "Rome", noised=True)
            probe_probabilities(model, probes, FACT, NoiseConfig(0.5, 2, 0))
    sample_essence_texts(model, tok, FACT, n_samples=2, max_new_tokens=4)
    greedy_completions(model, tok, [FACT.prompt, "Hello"], max_new_tokens=3, progress=False)


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_every_path_names_its_device(family, tok, stats):
    """No tensor factory under locedit runs without device= on any stage's path."""
    model = editable_tiny_model(family, n_layers=4)
    stats.ensure(model, [0, 1, 2, 3], progress=False)
    with implicit_device_guard() as guard:
        stats.ensure(model, [0, 1, 2, 3], progress=False)
        run_every_path(model, tok, stats)
    assert guard.violations == []


def test_guard_catches_an_injected_implicit_cpu_tensor(tok, stats, monkeypatch):
    """A ``torch.zeros(...)`` without device= in the edit loss fails under the guard, though the
    same code runs fine on the CPU without it."""
    import locedit.editing.loss as loss

    source = (
        "import torch\n"
        "def _row_totals(log_probs, rows, tokens, size, rewrite):\n"
        "    picked = log_probs.gather(1, tokens[:, None])[:, 0]\n"
        "    totals = torch.zeros(size, dtype=picked.dtype).index_add(0, rows, picked)\n"
        "    return totals[rewrite]\n"
    )
    namespace: dict = {}
    exec(compile(source, loss.__file__, "exec"), namespace)  # the bug, "inside" loss.py
    monkeypatch.setattr(loss, "_row_totals", namespace["_row_totals"])
    model = editable_tiny_model("gpt2", n_layers=4)
    hp = hparams_for("rome", overrides=FAST)
    with edited(model, tok, "rome", REQUEST, 1, hp, stats):
        pass  # without the guard the bug is invisible on the CPU
    with pytest.raises(ImplicitDeviceError, match=r"torch.zeros.*loss.py"):
        with implicit_device_guard():
            with edited(model, tok, "rome", REQUEST, 1, hp, stats):
                pass


def test_guard_ignores_other_packages_and_explicit_devices():
    with implicit_device_guard(package=str(Path(locedit.__file__).parent)) as guard:
        torch.zeros(3)  # this test file is not under locedit
        torch.as_tensor(torch.ones(2, device="cpu"))
    assert guard.violations == []
    with pytest.raises(ImplicitDeviceError):
        with implicit_device_guard(package=str(Path(__file__).parent)):
            torch.randn(3)


def test_no_factory_call_under_locedit_lacks_a_device():
    """The static half of the guard: also the paths no test runs name their device."""
    import ast

    factories = {f.__name__ for f in FACTORIES}
    missing = []
    for path in sorted(Path(locedit.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            func = getattr(node, "func", None)
            if (
                isinstance(node, ast.Call)
                and isinstance(func, ast.Attribute)
                and func.attr in factories
                and isinstance(func.value, ast.Name)
                and func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)
            ):
                missing.append(f"{path.name}:{node.lineno} torch.{func.attr}")
    assert missing == []


# ------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_snapshot_restores_bit_exact_in_every_dtype(dtype):
    model = tiny_model("gpt2", n_layers=2).to(dtype)
    name = "transformer.h.0.mlp.c_proj.weight"
    param = dict(model.named_parameters())[name]
    param.data[0, 0] = 0.0
    snapshot = WeightSnapshot(model, [name])
    with torch.no_grad():
        param.add_(torch.randn(param.shape, device="cpu").to(dtype))
        param[0, 0] = -0.0  # equal by ==, different bits
    assert snapshot.changed() == [name]
    snapshot.restore()
    assert snapshot.changed() == [] and same_bits(param.detach(), snapshot.saved[name])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_edits_report_float32(dtype, tok, stats):
    """ROME, MEMIT and FT run on bfloat16/float16 weights with float32 losses and
    probabilities, and restore the weights bit for bit."""
    model = editable_tiny_model("gemma3_text", n_layers=4)
    stats.ensure(model, [0, 1, 2, 3], progress=False)  # statistics of the float32 model
    half = copy.deepcopy(model).to(getattr(torch, dtype))
    stats.ensure(half, [0, 1, 2, 3], progress=False)
    before = {n: p.detach().clone() for n, p in half.named_parameters()}
    for method in ("rome", "memit", "ft1"):
        hp = hparams_for(method, overrides=FAST if method != "ft1" else {"steps": 3})
        with edited(half, tok, method, REQUEST, 1, hp, stats) as result:
            assert all(isinstance(v, float) for v in result.diagnostics.values())
            assert down_proj_weight(half, 1).dtype == getattr(torch, dtype)
    assert all(same_bits(p.detach(), before[n]) for n, p in half.named_parameters())


# -------------------------------------------------------------------- CPU vs device


@pytest.mark.device
@pytest.mark.parametrize("device", DEVICES)
def test_tracing_agrees_across_devices(device, tok):
    model = editable_tiny_model("llama", n_layers=4)
    moved = copy.deepcopy(model).to(device)
    for reference, result in zip(
        trace_fact_many(model, tok, FACT, sigma=0.5, kinds=("mlp", "attn"), windows=(3,), n_samples=3),
        trace_fact_many(moved, tok, FACT, sigma=0.5, kinds=("mlp", "attn"), windows=(3,), n_samples=3),
        strict=True,
    ):
        assert abs(result.p_clean - reference.p_clean) < 1e-4
        assert abs(result.p_noised - reference.p_noised) < 1e-4
        assert abs(result.p_restored - reference.p_restored).max() < 1e-4
    zero_cpu, zero_dev = zero_fact(model, tok, FACT, window=3), zero_fact(moved, tok, FACT, window=3)
    assert abs(zero_cpu.p_zeroed - zero_dev.p_zeroed).max() < 1e-4


@pytest.mark.device
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(REGISTRY))
def test_edits_agree_across_devices(device, method, tok, stats):
    model = editable_tiny_model("gpt2", n_layers=4)
    stats.ensure(model, [0, 1, 2, 3], progress=False)  # the device copy reads the same files
    moved = copy.deepcopy(model).to(device)
    eps = 1e-2
    ft = method.startswith("ft")
    hp = hparams_for(method, overrides={"steps": 5, "linf_eps": eps} if ft else FAST)
    updates = []
    for net in (model, moved):
        original = down_proj_weight(net, 1).detach().double().cpu().clone()
        with edited(net, tok, method, REQUEST, 1, hp, stats):
            updates.append(down_proj_weight(net, 1).detach().double().cpu() - original)
        assert torch.equal(down_proj_weight(net, 1).detach().double().cpu(), original)
    reference, result = updates
    if ft:  # Adam's sign-like steps: compare inside the L-inf box
        assert result.abs().max() <= eps and reference.abs().max() <= eps
        assert (result - reference).abs().max() <= eps
    else:
        assert float((result - reference).norm() / reference.norm()) < 1e-3


# ---------------------------------------------------------------------------- imports


def test_core_imports_without_the_pipeline_tools():
    """The GPU machine has torch and transformers but no mlflow, dvc, optuna, hydra, omegaconf,
    gguf or ray: the modules the GPU check and the device tests use import without them."""
    blocked = ["mlflow", "dvc", "optuna", "hydra", "omegaconf", "gguf", "ray"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import locedit.models, locedit.tracing, locedit.editing, locedit.metrics\n"
        "import locedit.data.filter, locedit.sweep.worker, locedit.testing\n"
        "import locedit.models.device, locedit.problems\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(locedit.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def test_wide_moments_take_several_passes_and_the_solver_cache_has_a_byte_bound(tok, tmp_path):
    """GPT-J-sized moments (2 GiB each in float64) must not all accumulate at once: here a
    budget of one 128x128 float64 matrix per pass, and a cache bound of one solver."""
    model = editable_tiny_model("gpt2", n_layers=4)  # d_mlp 256
    store = CovarianceStore(
        tmp_path, CorpusSpec(n_samples=4, sample_length=8), tok,
        moment_budget_bytes=8 * 256 * 256, max_cached_bytes=1,
    )
    passes = []
    original = store._compute
    store._compute = lambda m, layers, progress: passes.append(layers) or original(m, layers, progress)
    store.ensure(model, [0, 1, 2], progress=False)
    assert passes == [[0], [1], [2]]
    store.solver(model, 0)
    store.solver(model, 1)
    assert len(store._solvers) == 1


def test_bad_device_settings_are_refused_in_one_line():
    pytest.importorskip("omegaconf")  # not on the GPU check's machine
    from omegaconf import OmegaConf

    from locedit.params import apply_overrides

    params = OmegaConf.create({"model": {"device": "auto", "dtype": "float32"}, "edit": {"gpus_per_worker": 1}})
    apply_overrides(params, ["model.device=cuda:1", "model.dtype=bfloat16", "edit.gpus_per_worker=0.5"])
    for bad, expected in [("model.device=gpu", "model.device='gpu'"), ("model.dtype=int8", "model.dtype"),
                          ("edit.gpus_per_worker=0", "gpus_per_worker")]:
        with pytest.raises(ValueError, match=expected):
            apply_overrides(OmegaConf.create({"model": {"device": "auto"}}), [bad])


# ------------------------------------------------- issue 25: what an H200 run showed


def every_stage(model, tok, store, methods):
    """Key statistics, tracing (fast, reference, zeroing), an edit by each of ``methods`` with
    the metric probes inside it, and essence sampling."""
    store.ensure(model, [0, 1, 2, 3], progress=False)
    trace_fact_many(model, tok, FACT, sigma=0.5, kinds=("mlp",), windows=(3,), n_samples=2)
    trace_fact_reference(model, tok, FACT, sigma=0.5, window=3, n_samples=2)
    zero_fact(model, tok, FACT, window=3)
    for method in methods:
        hp = hparams_for(method, overrides={"steps": 3} if method.startswith("ft") else FAST)
        with edited(model, tok, method, REQUEST, 1, hp, store):
            probes = build_probes(tok, FACT, "Rome", noised=True)
            probe_probabilities(model, probes, FACT, NoiseConfig(0.5, 2, 0))
    sample_essence_texts(model, tok, FACT, n_samples=2, max_new_tokens=4)


@pytest.mark.device
@pytest.mark.parametrize("device", DEVICES)
def test_no_stage_moves_the_users_model(device, tok, tmp_path, monkeypatch):
    """No stage calls ``_apply``/``to``/``cpu`` on the model it was given (Lightning's
    ``Strategy.teardown()`` calls ``.cpu()`` on its module after every fit: on a GPU that moved
    the whole model to the CPU after each FT edit), and FT still trains through a Trainer."""
    from lightning.pytorch import Trainer
    from torch import nn

    model = editable_tiny_model("gpt2", n_layers=4).to(device)
    mine = {id(m) for m in model.modules()}
    calls: list[str] = []
    for name in ("_apply", "to", "cpu"):
        original = getattr(nn.Module, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if id(self) in mine:
                calls.append(f"{type(self).__name__}.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(nn.Module, name, spy)
    fits = []
    original_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: fits.append(1) or original_fit(self, *a, **k))
    store = CovarianceStore(tmp_path, CorpusSpec(n_samples=8, sample_length=16), tok)
    every_stage(model, tok, store, list(REGISTRY))
    assert calls == []
    assert len(fits) == 2  # FT-1 and FT-5 ran as Lightning fits


def test_one_store_factorises_for_each_device(tok, stats):
    """One CovarianceStore serving the same weights on two devices returns each model its
    factorisation on that model's device (MEMIT's single-key solve on CUDA got the CPU one);
    the meta device stands in for the GPU."""
    model = editable_tiny_model("gpt2", n_layers=4)
    stats.ensure(model, [1], progress=False)
    elsewhere = copy.deepcopy(model).to("meta")
    stats.share_statistics(elsewhere, model)
    here = stats.solver(model, 1)
    there = stats.solver(elsewhere, 1)
    assert here.matrix.device.type == here.factor.device.type == "cpu"
    assert there.matrix.device.type == there.factor.device.type == "meta"
    assert stats.solver(model, 1) is here and stats.solver(elsewhere, 1) is there
    assert there.ridge == here.ridge and there.matrix.shape == here.matrix.shape


def _compiled_in(path: str, source: str, name: str, namespace: dict | None = None):
    """A function whose code claims to live in ``path`` (how the guard sees frames)."""
    namespace = {"torch": torch, **(namespace or {})}
    exec(compile(source, path, "exec"), namespace)
    return namespace[name]


def test_guard_blames_the_frame_that_called_the_factory(tok):
    """Factory calls made by torch or transformers inside a locedit call pass; a locedit call
    without device= fails also when torch is between it and the guard's caller frame.

    The two library calls are the ones an H200 run failed on (torch 2.11's Adam step counter,
    transformers 5.17's sliding-window cache), compiled here as if in those files, since the
    locked versions here name their device; then a real Adam step and Gemma-3 forward."""
    import transformers.cache_utils
    from torch.optim import adam

    import locedit.editing.vstar as vstar
    import locedit.tracing.causal_trace as causal_trace

    step_counter = _compiled_in(
        adam.__file__, "def init_group():\n    return torch.tensor(0.0, dtype=torch.float32)\n",
        "init_group",
    )
    window = _compiled_in(
        transformers.cache_utils.__file__,
        "def sliding(n):\n    return torch.tensor(n, dtype=torch.long)\n", "sliding",
    )
    from_vstar = _compiled_in(
        vstar.__file__, "def step(f):\n    return f()\n", "step"
    )
    from_trace = _compiled_in(
        causal_trace.__file__, "def run(f):\n    return f(16)\n", "run"
    )
    implicit = _compiled_in(
        vstar.__file__, "def implicit():\n    return torch.zeros(3)\n", "implicit"
    )
    model = editable_tiny_model("gemma3_text", n_layers=2)
    delta = torch.zeros(4, requires_grad=True, device="cpu")
    optimiser = torch.optim.Adam([delta])
    with implicit_device_guard() as guard:
        from_vstar(step_counter)
        from_trace(window)
        delta.sum().backward()
        from_vstar(optimiser.step)
        from_vstar(lambda: model(input_ids=torch.tensor([[1, 2, 3]], device="cpu")))
    assert guard.violations == []
    with pytest.raises(ImplicitDeviceError, match=r"torch.zeros.*vstar.py"):
        with implicit_device_guard():
            from_vstar(implicit)
    # ... also when torch calls the locedit code (a forward hook) that makes the tensor.
    handle = model.model.layers[0].register_forward_hook(lambda *_: implicit() and None)
    try:
        with pytest.raises(ImplicitDeviceError, match=r"torch.zeros.*vstar.py"):
            with implicit_device_guard():
                model(input_ids=torch.tensor([[1, 2, 3]], device="cpu"))
    finally:
        handle.remove()


def _layer_calls(model):
    """Records (batch, query length, cuDNN attention allowed) of every decoder-layer call."""
    from locedit.models.hooks import decoder_layers, hidden_of

    seen: list[tuple[int, int, bool]] = []

    def hook(_module, _inputs, output):
        hidden = hidden_of(output)
        seen.append((int(hidden.shape[0]), int(hidden.shape[1]),
                     torch.backends.cuda.cudnn_sdp_enabled()))

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    return seen, handles


def test_bfloat16_traces_on_the_float32_path(tok):
    """bfloat16 tracing runs the same layer calls as float32 (the noised run's keys and values
    reused for the prefix before each restored token, so queries shorter than the prompt), on
    the attention kernels float32 uses (no cuDNN: a plan per shape made it 22x slower on an
    H200)."""
    from locedit.tracing.causal_trace import FactRuns
    from locedit.tracing.patching import encode_fact, tracing_noise

    model = editable_tiny_model("gemma3_text", n_layers=4)
    half = copy.deepcopy(model).to(torch.bfloat16)
    paths, results = [], []
    for net in (model, half):
        inp = encode_fact(tok, FACT)
        assert FactRuns.compute(net, inp, tracing_noise(net, inp, 0.5, 0, 2), ["mlp"]).kv is not None
        seen, handles = _layer_calls(net)
        try:
            results.append(trace_fact_many(net, tok, FACT, sigma=0.5, windows=(3,), n_samples=2)[0])
        finally:
            for handle in handles:
                handle.remove()
        paths.append(seen)
    assert paths[0] == paths[1]
    full = len(encode_fact(tok, FACT).input_ids)
    assert any(length < full for _, length, _ in paths[1])  # the prefix KV reuse ran
    assert not any(cudnn for *_, cudnn in paths[1])
    assert torch.backends.cuda.cudnn_sdp_enabled()  # and is back on after the trace
    assert results[1].p_restored.dtype == np.float64 and np.isfinite(results[1].p_restored).all()


EDIT_PROMPT = "My favourite place is the Eiffel Tower"


def _log_p(model, tok):
    from locedit.models.scoring import target_log_probs
    from locedit.models.tokens import encode_prompt, encode_target

    ids = encode_prompt(tok, EDIT_PROMPT, "Eiffel Tower").input_ids
    return target_log_probs(model, [ids], [encode_target(tok, EDIT_PROMPT, "Rome")]).item()


def test_every_method_edits_bfloat16_as_float32(tok, stats):
    """Every registered method edits a bfloat16 model with finite float32 losses and moves
    log p(target) as it does in float32; v*/z* keep ||v_init|| in float32 (the clamp radius:
    with a binding clamp ||delta|| / ||v_init|| is the clamp factor to float32 precision, not
    to bfloat16's 0.4%); an FT ball smaller than bfloat16's resolution fails naming the dtype."""
    from locedit.editing import EditFailed

    model = editable_tiny_model("gemma3_text", n_layers=8)
    stats.ensure(model, range(8), progress=False)
    half = copy.deepcopy(model).to(torch.bfloat16)
    stats.share_statistics(half, model)
    request = EditRequest(EDIT_PROMPT, "Eiffel Tower", "Rome")
    fast = {"n_context_templates": 2, "context_template_lengths": (4,), "v_steps": 8}
    for method in REGISTRY:
        hp = hparams_for(method, overrides={"linf_eps": 1e-2} if method.startswith("ft") else fast)
        moved = []
        for net in (model, half):
            before = _log_p(net, tok)
            with edited(net, tok, method, request, 3, hp, stats) as result:
                moved.append(_log_p(net, tok) - before)
            losses = {k: v for k, v in result.diagnostics.items() if "loss" in k or "prob" in k}
            assert losses and all(isinstance(v, float) and np.isfinite(v) for v in losses.values())
        assert moved[0] > 1.0, (method, moved)  # nats: the float32 edit works ...
        assert moved[1] > 0.7 * moved[0], (method, moved)  # ... and bfloat16 as well
        if not method.startswith("ft"):
            prefix = "v" if method == "rome" else "z"
            clamped = hparams_for(method, overrides={**fast, "v_steps": 3, "clamp_norm_factor": 1e-3})
            with edited(half, tok, method, request, 3, clamped, stats) as result:
                ratio = result.diagnostics[f"{prefix}_delta_norm"] / result.diagnostics[f"{prefix}_init_norm"]
            assert ratio == pytest.approx(1e-3, rel=1e-5), method
    tiny_ball = hparams_for("ft1", overrides={"linf_eps": 1e-9})
    with edited(model, tok, "ft1", request, 3, tiny_ball, stats):
        pass  # float32 resolves a 1e-9 ball around its smallest weights
    with pytest.raises(EditFailed, match="bfloat16 resolution"):
        with edited(half, tok, "ft1", request, 3, tiny_ball, stats):
            pass
