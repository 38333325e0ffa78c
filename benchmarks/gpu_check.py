"""Tracing and editing on an accelerator: seconds per traced fact and per edit, peak memory.

Runs on a bare machine with torch and transformers (no mlflow, dvc, optuna, hydra, omegaconf,
gguf, ray, network or model weights): the models are built with random weights from the exact
configs in ``benchmarks/configs/`` (timings and memory do not depend on weight values), the
tokenizer is GPT-2's from ``benchmarks/assets/gpt2``, the facts are fixed CounterFact-style
records below. Writes ``benchmarks/results/tracing-<device>.json`` and
``editing-<device>.json``.

    PYTHONPATH=src python3 benchmarks/gpu_check.py                 # CUDA, Gemma-3-270M + GPT-J-6B
    PYTHONPATH=src python3 benchmarks/gpu_check.py --dry           # CPU, tiny shapes, < 1 min

``scripts/gpu_check.sh`` (``make gpu-check``) runs the device tests first, then this.
"""

from __future__ import annotations

import argparse
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
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from locedit.data.records import FactRecord  # noqa: E402
from locedit.editing import CorpusSpec, CovarianceStore, EditRequest, edited, hparams_for  # noqa: E402
from locedit.models.architecture import n_layers  # noqa: E402
from locedit.models.device import model_device, parse_dtype, resolve_device  # noqa: E402
from locedit.models.discovery import prepare_architecture  # noqa: E402
from locedit.models.noise import NoiseConfig  # noqa: E402
from locedit.sweep.plan import EditTask  # noqa: E402
from locedit.sweep.worker import EvaluationConfig, run_fact  # noqa: E402
from locedit.testing import gpt2_tokenizer  # noqa: E402
from locedit.tracing import trace_fact_many  # noqa: E402

log = logging.getLogger("benchmarks.gpu_check")
CONFIGS = REPO / "benchmarks" / "configs"
METHODS = ("rome", "memit", "ft1", "ft5")

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
SHAPES = {
    "gemma-3-270m": ("gemma-3-270m.json", "float32", 5, 3, (0, 5, 9, 17)),
    "gemma-3-270m-bf16": ("gemma-3-270m.json", "bfloat16", 3, 2, None),
    "gpt-j-6b-bf16": ("gpt-j-6b.json", "bfloat16", 2, 1, None),
}
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


def trace_bench(model, tokenizer, n_facts: int) -> dict:
    """Seconds per traced fact: MLP, window 5, 10 noise samples (the first fact warms up)."""
    device = model_device(model)
    facts = FACTS[: max(1, n_facts)]
    sigma = 0.1

    def one(fact):
        return trace_fact_many(
            model, tokenizer, fact, sigma=sigma, kinds=("mlp",), windows=(5,), n_samples=10
        )

    warmup, _ = timed(device, lambda: one(facts[0]))
    reset_peak(device)
    seconds = [timed(device, lambda f=f: one(f))[0] for f in facts]
    return {
        "seconds_per_fact": statistics.mean(seconds),
        "seconds_each": [round(s, 4) for s in seconds],
        "warmup_seconds": round(warmup, 3),
        "n_facts": len(facts),
        "kind": "mlp", "window": 5, "n_samples": 10,
        "peak_gpu_mb": peak_mb(device),
    }


def method_hparams(method: str, dry: bool):
    """The paper's hyperparameters (App. A); the dry run takes 3 optimisation steps."""
    if not dry:
        return hparams_for(method)
    return hparams_for(method, overrides={"steps": 3} if method.startswith("ft") else {
        "v_steps": 3, "n_context_templates": 2, "context_template_lengths": (4,)})


def edit_bench(
    model, tokenizer, store: CovarianceStore, n_facts: int, layer: int, dry: bool = False
) -> dict:
    """Seconds per edit of each method at ``layer`` (Error Injection, paper hyperparameters);
    the first edit of each method (context templates, key statistics) is reported apart (the
    dry run times that one only)."""
    device = model_device(model)
    out = {}
    for method in METHODS:
        hp = method_hparams(method, dry)
        times, first = [], None
        reset_peak(device)
        for index, fact in enumerate(FACTS[: 1 if dry else max(1, n_facts) + 1]):
            request = EditRequest(fact.prompt, fact.subject, fact.target_new)

            def run(request=request, hp=hp, method=method):
                with edited(model, tokenizer, method, request, layer, hp, store) as result:
                    return result

            seconds, result = timed(device, run)
            if index == 0:
                first = seconds
                if not dry:
                    continue
            times.append(seconds)
        out[method] = {
            "seconds_per_edit": statistics.mean(times),
            "seconds_each": [round(s, 4) for s in times],
            "first_edit_seconds": round(first, 3),
            "layers": list(result.layers),
            "peak_gpu_mb": peak_mb(device),
        }
        log.info("%s: %.3f s/edit", method, out[method]["seconds_per_edit"])
    return out


def sweep_bench(model, tokenizer, store, layers, out_dir: Path, dry: bool = False) -> dict:
    """One fact of the default experiment's sweep (4 methods x its 4 layers, Error Injection,
    no essence samples) through the sweep's own worker; x5 facts estimates the default run."""
    device = model_device(model)
    fact = FACTS[0]
    hparams = {(m, "error_injection"): method_hparams(m, dry) for m in METHODS}
    tasks = [EditTask(fact.fact_id, layer, m, "error_injection", "gpu-check")
             for m in METHODS for layer in layers]
    rows: list[dict] = []
    config = EvaluationConfig(NoiseConfig(0.1, 10, 0), essence=False)
    seconds, _ = timed(device, lambda: run_fact(
        model, tokenizer, store, fact, tasks, hparams, config, rows.append, out_dir / "pre", "gpu"
    ))
    return {
        "edits": len(rows),
        "ok": sum(r["status"] == "ok" for r in rows),
        "seconds_one_fact": round(seconds, 3),
        "estimated_default_sweep_seconds": round(5 * seconds, 1),
        "note": "measured for 1 fact x 4 methods x 4 layers; the default run has 5 facts",
    }


def machine(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes: does it all run?")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--suffix", default=None, help="file suffix (default: the device type)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = resolve_device("cpu" if args.dry else args.device)
    suffix = args.suffix or ("dry" if args.dry else device.type)
    tokenizer = gpt2_tokenizer()
    tracing: dict = {"machine": machine(device), "dry": args.dry, "shapes": {}}
    editing: dict = {"machine": machine(device), "dry": args.dry, "shapes": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="locedit-gpu-check-") as work:
        for shape in args.shapes:
            _, dtype, n_trace, n_edit, sweep_layers = SHAPES[shape]
            if args.dry:
                n_trace, n_edit = 1, 1
            log.info("%s (%s) on %s", shape, dtype, device)
            reset_peak(device)
            build_s, model = timed(device, lambda shape=shape: build_model(shape, device, args.dry))
            total = n_layers(model)
            layer = total // 2
            params = sum(p.numel() for p in model.parameters())
            common = {"dtype": dtype, "n_layers": total, "parameters": params,
                      "build_seconds": round(build_s, 2), "weights_gpu_mb": peak_mb(device)}
            tracing["shapes"][shape] = {**common, **trace_bench(model, tokenizer, n_trace)}
            log.info("%s tracing: %.3f s/fact", shape, tracing["shapes"][shape]["seconds_per_fact"])
            samples = 8 if args.dry else (64 if "gpt-j" in shape else 200)
            corpus = CorpusSpec(n_samples=samples, sample_length=16 if args.dry else 64)
            store = CovarianceStore(Path(work) / shape, corpus, tokenizer)
            stats_layers = range(max(0, layer - 4), layer + 1)
            stats_s, _ = timed(
                device, lambda m=model, s=store, ls=stats_layers: s.ensure(m, ls, progress=False)
            )
            entry = {**common, "edit_layer": layer, "stats_seconds_5_layers": round(stats_s, 2),
                     "stats_samples": samples,
                     "methods": edit_bench(model, tokenizer, store, n_edit, layer, args.dry)}
            if sweep_layers is not None:
                layers = [x for x in sweep_layers if x < total] if not args.dry else [layer]
                entry["default_sweep"] = sweep_bench(
                    model, tokenizer, store, layers, Path(work), args.dry
                )
            editing["shapes"][shape] = entry
            del model, store
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # Written after every shape, so a run cut short keeps what it measured.
            seconds = time.perf_counter() - started
            tracing["seconds_total"] = editing["seconds_total"] = round(seconds, 1)
            (args.out / f"tracing-{suffix}.json").write_text(json.dumps(tracing, indent=2) + "\n")
            (args.out / f"editing-{suffix}.json").write_text(json.dumps(editing, indent=2) + "\n")
    summary = summarise(tracing, editing)
    print(summary)
    return {"tracing": tracing, "editing": editing}


def summarise(tracing: dict, editing: dict) -> str:
    lines = [f"device {tracing['machine']['device']} ({tracing['machine'].get('gpu', 'CPU')}), "
             f"{tracing['seconds_total']} s in all"]
    for shape, entry in tracing["shapes"].items():
        edits = editing["shapes"][shape]["methods"]
        per = ", ".join(f"{m} {v['seconds_per_edit']:.3f}" for m, v in edits.items())
        lines.append(f"{shape}: trace {entry['seconds_per_fact']:.3f} s/fact; s/edit: {per}; "
                     f"peak GPU MB {max((v['peak_gpu_mb'] or 0) for v in edits.values())}")
        sweep = editing["shapes"][shape].get("default_sweep")
        if sweep:
            lines.append(f"  default sweep: {sweep['ok']}/{sweep['edits']} edits ok in "
                         f"{sweep['seconds_one_fact']} s for one fact -> ~"
                         f"{sweep['estimated_default_sweep_seconds']} s for the default 5 facts")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
