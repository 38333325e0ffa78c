"""Tracing and editing on an accelerator: seconds per traced fact and per edit, peak memory.

Runs on a bare machine with torch and transformers (no mlflow, dvc, optuna, hydra, omegaconf,
gguf, ray, network or model weights): the models are built with random weights from the exact
configs in ``benchmarks/configs/`` (timings and memory do not depend on weight values), the
tokenizer is GPT-2's from ``benchmarks/assets/gpt2``, the facts are fixed CounterFact-style
records below. Writes ``benchmarks/results/tracing-<device>.json`` and
``editing-<device>.json``: every registered method on every shape; a method (or a shape) that
fails or does not fit the time budget is recorded with its reason and the run goes on, and the
exit status is non-zero at the end. The first shape also gets a torch.profiler breakdown of
one ROME edit and one traced fact (kernel time, kernel launches, host-device
synchronisations), and the bfloat16 shape a comparison with cuDNN attention allowed
(:func:`locedit.models.device.attention_without_cudnn`).

    PYTHONPATH=src python3 benchmarks/gpu_check.py                 # CUDA, all shapes
    PYTHONPATH=src python3 benchmarks/gpu_check.py --dry           # CPU, tiny shapes, < 1 min

``scripts/gpu_check.sh`` (``make gpu-check``) runs the device tests first, then this.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LOCEDIT_GPT2_TOKENIZER_DIR", str(REPO / "benchmarks" / "assets" / "gpt2"))

import torch  # noqa: E402
import transformers  # noqa: E402
from throughput import sweep_throughput  # noqa: E402  (benchmarks/, this script's folder)
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from locedit.data.records import FactRecord  # noqa: E402
from locedit.editing import CorpusSpec, CovarianceStore, EditRequest, edited, hparams_for  # noqa: E402
from locedit.editing.layers import layer_grid  # noqa: E402
from locedit.editing.methods import METHODS as PAPER_METHODS  # noqa: E402
from locedit.editing.methods import REGISTRY  # noqa: E402
from locedit.models import device as device_settings  # noqa: E402
from locedit.models.architecture import n_layers  # noqa: E402
from locedit.models.device import model_device, parse_dtype, resolve_device  # noqa: E402
from locedit.models.discovery import prepare_architecture  # noqa: E402
from locedit.models.noise import NoiseConfig  # noqa: E402
from locedit.sweep.plan import EditTask  # noqa: E402
from locedit.sweep.worker import EvaluationConfig, run_facts  # noqa: E402
from locedit.testing import gpt2_tokenizer  # noqa: E402
from locedit.tracing import trace_fact_many  # noqa: E402

log = logging.getLogger("benchmarks.gpu_check")
CONFIGS = REPO / "benchmarks" / "configs"
METHODS = tuple(REGISTRY)
#: Packages whose machine and locked versions the check reports.
VERSIONED = ("torch", "transformers", "huggingface_hub", "tokenizers", "safetensors", "lightning",
             "pytorch-lightning", "torchmetrics", "numpy", "pandas", "pytest")

#: CounterFact-style records (case 0 and well-known facts); random-weight models do not know
#: them, which does not change the work a trace or an edit does.
FACTS = [
    FactRecord(
        "cf-0", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French",
        "English",
        paraphrase_prompts=("Danielle Darrieux, a native", "Danielle Darrieux spoke the language"),
        neighborhood_prompts=("The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"),
    ),
    FactRecord(
        "eiffel", "The Eiffel Tower", "The Eiffel Tower is located in the city of", "Paris", "Rome",
        paraphrase_prompts=("Where is the Eiffel Tower? It is in",),
        neighborhood_prompts=("The Louvre is located in the city of",),
    ),
    FactRecord(
        "messi", "Lionel Messi", "Lionel Messi plays the sport of", "football", "basketball",
        paraphrase_prompts=("Lionel Messi is a professional",),
        neighborhood_prompts=("Cristiano Ronaldo plays the sport of",),
    ),
    FactRecord(
        "hamlet", "Hamlet", "The play Hamlet was written by", "William Shakespeare", "Goethe",
        paraphrase_prompts=("Hamlet is a tragedy by",),
        neighborhood_prompts=("The play Macbeth was written by",),
    ),
    FactRecord(
        "windows", "Windows 10", "Windows 10 was developed by", "Microsoft", "Apple",
        paraphrase_prompts=("The developer of Windows 10 is",),
        neighborhood_prompts=("Internet Explorer was developed by",),
    ),
]

#: Shapes: (config file, dtype, facts traced, facts edited per method, default-sweep layers).
#: Sized so that the whole check (device tests included) takes at most 4 minutes on one H200.
SHAPES = {
    "gemma-3-270m": ("gemma-3-270m.json", "float32", 3, 2, (0, 5, 9, 17)),
    "gemma-3-270m-bf16": ("gemma-3-270m.json", "bfloat16", 2, 1, None),
    "gpt-j-6b-bf16": ("gpt-j-6b.json", "bfloat16", 2, 1, None),
}
#: Issue 28's throughput targets: edits per second, each with every metric of the sweep's
#: worker (probes, essence, flags), at these group sizes, for these shapes (>= 10/s for
#: Gemma-3-270M, >= 2/s for GPT-J-6B in bfloat16).
GROUP_SIZES = (1, 4, 16, 64)
GROUPED = ("gemma-3-270m", "gpt-j-6b-bf16")
#: The dry run's stand-in: every shape's family at width 64 and 4 layers, on the CPU.
DRY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "n_embd": 64,
       "n_layer": 4, "n_head": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
       "head_dim": 16, "rotary_dim": 8, "vocab_size": 50304, "sliding_window": 16,
       "query_pre_attn_scalar": 16}


def build_model(shape: str, device: torch.device, dry: bool) -> torch.nn.Module:
    """The shape's model with random weights, built directly on ``device`` in its dtype."""
    config_file, dtype, *_ = SHAPES[shape]
    values = json.loads((CONFIGS / config_file).read_text())
    if dry:
        values.update({k: v for k, v in DRY.items() if k in values or k in ("head_dim",)})
        if "layer_types" in values:
            values["layer_types"] = values["layer_types"][: values["num_hidden_layers"]]
    model_type = values.pop("model_type")
    values.pop("architectures", None)
    values.pop("transformers_version", None)
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    model.eval()
    model.requires_grad_(False)
    prepare_architecture(model, None, check=True)
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed(device: torch.device, fn):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def failure(err: BaseException) -> str:
    """One line: the exception's type and message (CUDA OOM messages are long)."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400]


def trace_bench(model, tokenizer, n_facts: int, dry: bool = False) -> dict:
    """Seconds per traced fact: MLP, window 5, 10 noise samples (the first fact warms up, but
    in the dry run)."""
    device = model_device(model)
    facts = FACTS[: max(1, n_facts)]

    n_samples = 2 if dry else 10

    def one(fact):
        return trace_fact_many(
            model, tokenizer, fact, sigma=0.1, kinds=("mlp",), windows=(5,), n_samples=n_samples
        )

    warmup = 0.0 if dry else timed(device, lambda: one(facts[0]))[0]
    reset_peak(device)
    seconds = [timed(device, lambda f=f: one(f))[0] for f in facts]
    return {
        "seconds_per_fact": statistics.mean(seconds),
        "seconds_each": [round(s, 4) for s in seconds],
        "warmup_seconds": round(warmup, 3),
        "n_facts": len(facts),
        "kind": "mlp", "window": 5, "n_samples": n_samples,
        "peak_gpu_mb": peak_mb(device),
    }


def method_hparams(method: str, dry: bool):
    """The paper's hyperparameters (App. A); the dry run takes 3 optimisation steps."""
    if not dry:
        return hparams_for(method)
    return hparams_for(method, overrides={"steps": 3} if method.startswith("ft") else {
        "v_steps": 3, "n_context_templates": 2, "context_template_lengths": (4,)})


class Budget:
    """Wall-clock budget of the benchmarks: what would start after it is recorded as skipped
    (and fails the check: it no longer fits its 4 minutes)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def over(self) -> bool:
        return self.left() <= 0


def one_edit(model, tokenizer, store, method, hp, fact, layer):
    request = EditRequest(fact.prompt, fact.subject, fact.target_new)
    with edited(model, tokenizer, method, request, layer, hp, store) as result:
        return result


def edit_bench(
    model, tokenizer, store: CovarianceStore, n_facts: int, layer: int, budget: Budget,
    dry: bool = False,
) -> dict:
    """Seconds per edit of each method at ``layer`` (Error Injection, paper hyperparameters);
    the first edit of each method (context templates, factorisations) is reported apart (the
    dry run times that one only). A method that fails is recorded with its reason."""
    device = model_device(model)
    out: dict[str, dict] = {}
    for method in METHODS:
        if budget.over():
            out[method] = {"skipped": "over the check's time budget"}
            continue
        hp = method_hparams(method, dry)
        times, first, result = [], None, None
        reset_peak(device)
        try:
            for index, fact in enumerate(FACTS[: 1 if dry else max(1, n_facts) + 1]):
                seconds, result = timed(
                    device, lambda f=fact, m=method, h=hp: one_edit(model, tokenizer, store, m, h, f, layer)
                )
                if index == 0:
                    first = seconds
                    if not dry:
                        continue
                times.append(seconds)
        except Exception as err:  # noqa: BLE001 - recorded, the check goes on
            out[method] = {"failed": failure(err)}
            log.error("%s failed: %s", method, out[method]["failed"])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        out[method] = {
            "seconds_per_edit": statistics.mean(times),
            "seconds_each": [round(s, 4) for s in times],
            "first_edit_seconds": round(first, 3),
            "layers": list(result.layers),
            "flags": list(result.flags),
            "peak_gpu_mb": peak_mb(device),
        }
        log.info("%s: %.3f s/edit", method, out[method]["seconds_per_edit"])
    return out


def sweep_bench(model, tokenizer, store, layers, out_dir: Path, dry: bool = False) -> dict:
    """One fact of the default experiment's sweep (the paper's methods x its 4 layers, Error
    Injection, no essence samples) through the sweep's own worker; x5 facts estimates the
    default run."""
    device = model_device(model)
    fact = FACTS[0]
    hparams = {(m, "error_injection"): method_hparams(m, dry) for m in PAPER_METHODS}
    tasks = [EditTask(fact.fact_id, layer, m, "error_injection", "gpu-check")
             for m in PAPER_METHODS for layer in layers]
    rows: list[dict] = []
    config = EvaluationConfig(NoiseConfig(0.1, 10, 0), essence=False)
    seconds, _ = timed(device, lambda: run_facts(
        model, tokenizer, store, [fact], tasks, hparams, config, rows.append, out_dir / "pre", "gpu"
    ))
    return {
        "edits": len(rows),
        "ok": sum(r["status"] == "ok" for r in rows),
        "seconds_one_fact": round(seconds, 3),
        "estimated_default_sweep_seconds": round(5 * seconds, 1),
        "note": f"measured for 1 fact x {len(PAPER_METHODS)} methods x {len(layers)} layers; "
                "the default run has 5 facts",
    }


def cudnn_attention_bench(model, tokenizer, store, layer: int) -> dict:
    """bfloat16 with cuDNN attention allowed (torch's default on Hopper) against without (what
    locedit runs): one traced fact and one ROME edit each. CUDA only."""
    device = model_device(model)
    out: dict[str, object] = {"cudnn_sdp_enabled_by_default": torch.backends.cuda.cudnn_sdp_enabled()}
    fact = FACTS[1]
    for allowed in (True, False):
        device_settings.ALLOW_CUDNN_ATTENTION = allowed
        name = "with_cudnn" if allowed else "without_cudnn"
        try:
            out[f"trace_seconds_{name}"] = round(timed(device, lambda: trace_fact_many(
                model, tokenizer, fact, sigma=0.1, kinds=("mlp",), windows=(5,), n_samples=10
            ))[0], 3)
            seconds, result = timed(device, lambda: one_edit(
                model, tokenizer, store, "rome", hparams_for("rome"), fact, layer))
            out[f"rome_{name}"] = {"seconds": round(seconds, 3),
                                   "v_target_prob_last": result.diagnostics["v_target_prob_last"]}
        except Exception as err:  # noqa: BLE001 - the point of the comparison
            out[f"rome_{name}"] = {"failed": failure(err)}
        finally:
            device_settings.ALLOW_CUDNN_ATTENTION = False
    return out


#: Host-side calls that wait for the GPU (a .item()/float(tensor) is aten::_local_scalar_dense
#: followed by a device-to-host copy and a stream synchronisation).
SYNCS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile(device: torch.device, fn) -> dict:
    """torch.profiler over ``fn``: wall time, GPU kernel time and count, kernel-launch and
    synchronisation calls on the host, and the top operators by self time on each side."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        fn()
        synchronize(device)
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_s = sum(e.device_time_total for e in kernels) / 1e6 if kernels else None

    def host(names):
        chosen = [e for e in averages if e.key in names]
        return {"calls": sum(e.count for e in chosen),
                "seconds": round(sum(e.self_cpu_time_total for e in chosen) / 1e6, 4)}

    def top(attribute):
        ranked = sorted(averages, key=lambda e: getattr(e, attribute), reverse=True)[:10]
        return [[e.key, e.count, round(getattr(e, attribute) / 1e3, 2)] for e in ranked
                if getattr(e, attribute) > 0]

    return {
        "wall_seconds": round(wall, 4),
        "kernel_seconds": None if kernel_s is None else round(kernel_s, 4),
        "kernels": len(kernels),
        "gpu_busy_fraction": None if kernel_s is None else round(kernel_s / wall, 3),
        "kernel_launches": host(LAUNCHES),
        "syncs": {name: host((name,)) for name in SYNCS if host((name,))["calls"]},
        "item_calls": host(("aten::_local_scalar_dense",))["calls"],
        "top_self_cpu_ms": top("self_cpu_time_total"),
        "top_self_device_ms": top("self_device_time_total") if kernels else [],
        "note": "wall - kernel time is launch, Python and synchronisation overhead (kernels "
                "overlap the host when it runs ahead; a sync makes the host wait)",
    }


def profile_bench(model, tokenizer, store, layer: int, dry: bool = False) -> dict:
    """The profile of one ROME edit and one traced fact (both warmed up before)."""
    device = model_device(model)
    fact = FACTS[2]
    hp = method_hparams("rome", dry)
    return {
        "rome_edit": profile(device, lambda: one_edit(model, tokenizer, store, "rome", hp, fact, layer)),
        "traced_fact": profile(device, lambda: trace_fact_many(
            model, tokenizer, fact, sigma=0.1, kinds=("mlp",), windows=(5,),
            n_samples=2 if dry else 10)),
    }


def versions() -> dict[str, dict[str, str | None]]:
    """The machine's version of each package the check uses, and requirements.lock's."""
    locked = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            locked[name.strip().lower().replace("_", "-")] = version.strip()
    out = {}
    for name in VERSIONED:
        try:
            here = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            here = None
        out[name] = {"machine": here, "locked": locked.get(name.lower().replace("_", "-"))}
    return out


def machine(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformers_path": str(Path(transformers.__file__).parent),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "versions": versions(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def failures_of(tracing: dict, editing: dict) -> list[str]:
    """'shape/what: reason' for everything that failed or was skipped."""
    found = []
    for shape, entry in tracing["shapes"].items():
        for key in ("failed", "skipped"):
            if key in entry:
                found.append(f"{shape}/tracing: {key}: {entry[key]}")
    for shape, entry in editing["shapes"].items():
        for key in ("failed", "skipped"):
            if key in entry:
                found.append(f"{shape}: {key}: {entry[key]}")
        for method, result in entry.get("methods", {}).items():
            for key in ("failed", "skipped"):
                if key in result:
                    found.append(f"{shape}/{method}: {key}: {result[key]}")
        if "failed" in (entry.get("grouped") or {}):  # a size skipped for time is not a failure
            found.append(f"{shape}/grouped: failed: {entry['grouped']['failed']}")
    return found


#: ``experiment=paper``'s problems and layer grid (conf/experiment/paper.yaml).
PAPER_PROBLEMS, PAPER_GRID = 5, 9


def paper_projection(grouped: dict, depth: int) -> dict:
    """Hours of ``experiment=paper``'s sweep per 100 facts on this device (its four methods x
    five problems x the layer grid), from each method's best measured edits per second with
    every metric, at whichever group size: an estimate, since the rates are measured on Error
    Injection at one layer of a random-weight model."""
    layers = len(layer_grid(depth, PAPER_GRID, PAPER_METHODS))
    per_method = layers * PAPER_PROBLEMS * 100
    best = {}
    for method in PAPER_METHODS:
        rates = [v["edits_per_second"] for v in (grouped.get(method) or {}).values()
                 if isinstance(v, dict) and "edits_per_second" in v]
        if not rates:
            return {"skipped": f"no edits per second measured for {method}"}
        best[method] = max(rates)
    return {
        "layers": layers,
        "edits_per_100_facts": per_method * len(PAPER_METHODS),
        "best_edits_per_second": best,
        "sweep_hours_per_100_facts": round(sum(per_method / r for r in best.values()) / 3600, 2),
    }


def run_shape(shape, device, tokenizer, work: Path, budget: Budget, dry: bool):
    """(tracing entry, editing entry) of one shape; failures are recorded in them."""
    _, dtype, n_trace, n_edit, sweep_layers = SHAPES[shape]
    if dry:
        n_trace, n_edit = 1, 1
    log.info("%s (%s) on %s", shape, dtype, device)
    reset_peak(device)
    build_s, model = timed(device, lambda: build_model(shape, device, dry))
    total = n_layers(model)
    layer = total // 2
    common = {"dtype": dtype, "n_layers": total,
              "parameters": sum(p.numel() for p in model.parameters()),
              "build_seconds": round(build_s, 2), "weights_gpu_mb": peak_mb(device)}
    trace_entry, edit_entry = dict(common), {**common, "edit_layer": layer}
    try:
        trace_entry.update(trace_bench(model, tokenizer, n_trace, dry))
        log.info("%s tracing: %.3f s/fact", shape, trace_entry["seconds_per_fact"])
    except Exception as err:  # noqa: BLE001
        trace_entry["failed"] = failure(err)
    samples = 8 if dry else (32 if "gpt-j" in shape else 200)
    corpus = CorpusSpec(n_samples=samples, sample_length=16 if dry else 64)
    store = CovarianceStore(work / shape, corpus, tokenizer)
    stats_layers = range(max(0, layer - 4), layer + 1)
    try:
        stats_s, _ = timed(device, lambda: store.ensure(model, stats_layers, progress=False))
    except Exception as err:  # noqa: BLE001
        edit_entry["failed"] = f"key statistics: {failure(err)}"
        return trace_entry, edit_entry
    edit_entry.update(stats_seconds_5_layers=round(stats_s, 2), stats_samples=samples)
    edit_entry["methods"] = edit_bench(model, tokenizer, store, n_edit, layer, budget, dry)
    if sweep_layers is not None and not budget.over():
        layers = [x for x in sweep_layers if x < total] if not dry else [layer]
        try:
            edit_entry["default_sweep"] = sweep_bench(model, tokenizer, store, layers, work, dry)
        except Exception as err:  # noqa: BLE001
            edit_entry["default_sweep"] = {"failed": failure(err)}
    if shape == next(iter(SHAPES)) and not budget.over():
        try:
            edit_entry["profile"] = profile_bench(model, tokenizer, store, layer, dry)
        except Exception as err:  # noqa: BLE001
            edit_entry["profile"] = {"failed": failure(err)}
    if shape in GROUPED and not budget.over():
        # The edit layer only: its covariance factorisations are warm from edit_bench, so no
        # group size pays them; the sizes outgrow the five facts by editing them again.
        try:
            edit_entry["grouped"] = sweep_throughput(
                model, tokenizer, store, FACTS[:2] if dry else FACTS, [layer],
                {m: method_hparams(m, dry) for m in METHODS},
                (1, 2) if dry else GROUP_SIZES, min_edits=2 if dry else 4,
                budget=Budget(budget.left() / 2),  # the shapes after this one keep half
                config=EvaluationConfig(NoiseConfig(0.1, 3, 0), essence_samples=2 if dry else 5,
                                        essence_max_new_tokens=4 if dry else 30),
            )
        except Exception as err:  # noqa: BLE001
            edit_entry["grouped"] = {"failed": failure(err)}
        else:
            edit_entry["paper_projection"] = paper_projection(edit_entry["grouped"], total)
    if dtype != "float32" and "gemma" in shape and device.type == "cuda" and not budget.over():
        edit_entry["cudnn_attention"] = cudnn_attention_bench(model, tokenizer, store, layer)
    return trace_entry, edit_entry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes: does it all run?")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--suffix", default=None, help="file suffix (default: the device type)")
    parser.add_argument("--budget", type=float, default=135.0,
                        help="seconds; what would start later is recorded as skipped")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = resolve_device("cpu" if args.dry else args.device)
    suffix = args.suffix or ("dry" if args.dry else device.type)
    tokenizer = gpt2_tokenizer()
    info = machine(device)
    for name, pair in info["versions"].items():
        mark = "" if pair["machine"] == pair["locked"] else "   <- differs"
        print(f"version {name:18s} machine {pair['machine']!s:14s} locked {pair['locked']}{mark}")
    tracing: dict = {"machine": info, "dry": args.dry, "shapes": {}}
    editing: dict = {"machine": info, "dry": args.dry, "shapes": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    with tempfile.TemporaryDirectory(prefix="locedit-gpu-check-") as work:
        for shape in args.shapes:
            if budget.over():
                tracing["shapes"][shape] = {"skipped": "over the check's time budget"}
                editing["shapes"][shape] = {"skipped": "over the check's time budget"}
            else:
                try:
                    trace_entry, edit_entry = run_shape(
                        shape, device, tokenizer, Path(work), budget, args.dry)
                except Exception as err:  # noqa: BLE001 - e.g. out of memory building it
                    trace_entry = edit_entry = {"failed": failure(err)}
                tracing["shapes"][shape], editing["shapes"][shape] = trace_entry, edit_entry
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # Written after every shape, so a run cut short keeps what it measured.
            seconds = round(time.perf_counter() - budget.start, 1)
            failed = failures_of(tracing, editing)
            for record in (tracing, editing):
                record.update(seconds_total=seconds, failures=failed)
            (args.out / f"tracing-{suffix}.json").write_text(json.dumps(tracing, indent=2) + "\n")
            (args.out / f"editing-{suffix}.json").write_text(json.dumps(editing, indent=2) + "\n")
    print(summarise(tracing, editing))
    return {"tracing": tracing, "editing": editing}


def summarise(tracing: dict, editing: dict) -> str:
    lines = [f"device {tracing['machine']['device']} ({tracing['machine'].get('gpu', 'CPU')}), "
             f"{tracing['seconds_total']} s in all"]
    for shape, entry in tracing["shapes"].items():
        edits = editing["shapes"][shape].get("methods", {})
        per = ", ".join(
            f"{m} {v['seconds_per_edit']:.3f}" if "seconds_per_edit" in v else f"{m} FAILED"
            for m, v in edits.items()
        )
        trace = f"{entry['seconds_per_fact']:.3f} s/fact" if "seconds_per_fact" in entry else "FAILED"
        peak = max((v.get("peak_gpu_mb") or 0 for v in edits.values()), default=0)
        lines.append(f"{shape}: trace {trace}; s/edit: {per}; peak GPU MB {peak}")
        for method, sizes in (editing["shapes"][shape].get("grouped") or {}).items():
            if isinstance(sizes, dict):
                rates = ", ".join(
                    f"G={g} {v['edits_per_second']:.2f}/s" if "edits_per_second" in v
                    else f"G={g} {next(iter(v))}" for g, v in sizes.items()
                )
                lines.append(f"  grouped, every metric, {method}: {rates}")
        projected = editing["shapes"][shape].get("paper_projection") or {}
        if "sweep_hours_per_100_facts" in projected:
            lines.append(f"  experiment=paper sweep: ~{projected['sweep_hours_per_100_facts']} h "
                         f"per 100 facts ({projected['edits_per_100_facts']} edits)")
        sweep = editing["shapes"][shape].get("default_sweep")
        if sweep and "ok" in sweep:
            lines.append(f"  default sweep: {sweep['ok']}/{sweep['edits']} edits ok in "
                         f"{sweep['seconds_one_fact']} s for one fact -> ~"
                         f"{sweep['estimated_default_sweep_seconds']} s for the default 5 facts")
    failed = tracing.get("failures", [])
    lines.append(f"{len(failed)} failed or skipped" + "".join(f"\n  {f}" for f in failed))
    return "\n".join(lines)


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if outcome["tracing"].get("failures") else 0)
