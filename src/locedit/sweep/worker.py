"""Run the edits of one fact: pre-edit probabilities once, then every (method, problem, layer).

A failed edit becomes a row with ``status = failed`` and its reason; only a failed weight
restoration stops the sweep, because the model could no longer be trusted.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.data.records import FactRecord
from locedit.editing import EditFailed, EditRequest, edited
from locedit.metrics import neighborhood_kl as nkl
from locedit.metrics.evaluation import (
    EssenceTexts,
    build_probes,
    essence_perplexity,
    noise_for_request,
    probe_probabilities,
    sample_essence_texts,
    score_edit,
    target_probe_name,
)
from locedit.models.noise import fact_seed
from locedit.models.snapshot import RestorationError
from locedit.models.tokens import TokenizationError
from locedit.problems import (
    NoiseConfig,
    ProblemNotApplicable,
    compute_o_noise,
    edit_target,
    get_problem,
)
from locedit.storage import atomic_write_text, atomic_write_with, id_filename
from locedit.sweep.plan import EditTask, fact_content, shared_code_version
from locedit.versioning import code_version, content_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationConfig:
    """How edits are judged: the tracing noise and the essence samples (App. C)."""

    noise: NoiseConfig
    essence: bool = True
    essence_samples: int = 5
    essence_top_k: int = 5
    essence_max_new_tokens: int = 30
    seed: int = 0
    #: ``o_false`` (paper text) | ``problem`` (original code): the neighbourhood score's object
    neighborhood_target: str = "o_false"
    #: ``continuation`` (ours) | ``whole_text`` (original code): the essence perplexity's span
    essence_span: str = "continuation"
    #: CounterFact+'s neighbourhood KL (Hoelscher-Obermaier et al. 2023), off by default
    neighborhood_kl: nkl.NeighborhoodKLConfig = field(default_factory=nkl.NeighborhoodKLConfig)

    def key_content(self) -> dict[str, Any]:
        """What edit rows depend on, for their keys. The neighbourhood KL enters only when it
        is on (with its settings and the code version of its module), so a run without it keys
        its rows exactly as before the option existed and a run with it never reuses them."""
        content = asdict(self)
        del content["neighborhood_kl"]
        if self.neighborhood_kl.enabled:
            content["neighborhood_kl"] = {
                **self.neighborhood_kl.key_content(), "code": code_version(nkl.__name__),
            }
        return content


@dataclass
class PreEdit:
    """The unedited model's view of one fact, computed once and reused for every edit."""

    probs: dict[str, float]
    o_noise: str | None
    essence: EssenceTexts | None
    ppl_before: float | None


def pre_edit_key(record: FactRecord, problems: Sequence[str], context: str) -> str:
    """The pre-edit cache key: the fact's content, the problems (they decide which probes
    exist: o_noise, noised prompts), the evaluation context and the code version of the
    rows' shared path (this module computes the values, with the metrics)."""
    return content_key(
        "pre_edit", model=None, record=fact_content(record), params=[sorted(problems), context],
        code=shared_code_version(), length=24,
    )


def _pre_edit(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, record: FactRecord,
    problems: Sequence[str], config: EvaluationConfig, cache_dir: Path | None, context: str,
) -> PreEdit:
    # The essence span changes ppl_before; the scoring noise stream is part of the metrics' code
    # version (noise.py, evaluation.py), which the key already carries.
    if config.essence_span != "continuation":
        context = f"{context}:essence-{config.essence_span}"
    key = pre_edit_key(record, problems, context)
    cache = cache_dir / id_filename(record.fact_id, f"-{key}.json") if cache_dir else None
    if cache is not None and cache.exists():
        data = json.loads(cache.read_text())
        essence = data["essence"]
        return PreEdit(
            data["probs"], data["o_noise"],
            EssenceTexts(essence["prompt_length"], tuple(map(tuple, essence["sequences"]))) if essence else None,
            data["ppl_before"],
        )
    o_noise = compute_o_noise(model, tokenizer, record, config.noise) if "tracing_reversal" in problems else None
    probes = build_probes(tokenizer, record, o_noise, noised="fact_forcing" in problems)
    probs = probe_probabilities(model, probes, record, config.noise)
    essence, ppl = None, None
    if config.essence:
        essence = sample_essence_texts(
            model, tokenizer, record, config.essence_samples, config.essence_top_k,
            config.essence_max_new_tokens, config.seed,
        )
        ppl = essence_perplexity(model, essence, config.essence_span)
    pre = PreEdit(probs, o_noise, essence, ppl)
    if cache is not None:
        payload = {
            "fact_id": record.fact_id, "probs": probs, "o_noise": o_noise, "ppl_before": ppl,
            "essence": None if essence is None else {
                "prompt_length": essence.prompt_length, "sequences": [list(s) for s in essence.sequences]
            },
        }
        # Parallel workers may edit the same fact: a reader never sees half a file.
        atomic_write_text(cache, json.dumps(payload))
    return pre


@dataclass(frozen=True)
class KLReference:
    """The unedited model's next-token log-probabilities on the fact's (prefixed) neighbourhood
    prompts, [n_prompts, vocab] float32: what every edit's neighbourhood KL compares against."""

    prompts: tuple[tuple[int, ...], ...]
    log_probs: torch.Tensor


def kl_reference_key(record: FactRecord, config: nkl.NeighborhoodKLConfig, context: str) -> str:
    """The cache key of a fact's :class:`KLReference`: the fact's content, the KL settings, the
    evaluation context (model fingerprint, evaluation settings) and the KL module's code."""
    return content_key(
        "neighborhood_kl_pre", model=None, record=fact_content(record),
        params=[config.key_content(), context], code=code_version(nkl.__name__), length=24,
    )


def _kl_reference(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, record: FactRecord,
    config: nkl.NeighborhoodKLConfig, cache_dir: Path | None, context: str,
) -> KLReference:
    """Computed once per fact and stored beside the pre-edit probabilities as one float32
    tensor file (n_prompts x vocab x 4 bytes: 10 MB for ten prompts of Gemma's 262k words)."""
    cache = (
        cache_dir / id_filename(record.fact_id, f"-nkl-{kl_reference_key(record, config, context)}.pt")
        if cache_dir else None
    )
    if cache is not None and cache.exists():
        data = torch.load(cache, map_location="cpu", weights_only=True)
        return KLReference(tuple(map(tuple, data["prompts"])), data["log_probs"])
    prompts = nkl.kl_prompts(tokenizer, record, config.prefix)
    log_probs = nkl.next_token_distributions(model, prompts, config.batch_size)
    reference = KLReference(tuple(prompts), log_probs)
    if cache is not None:
        data = {"fact_id": record.fact_id, "prompts": [list(p) for p in prompts], "log_probs": log_probs}
        atomic_write_with(cache, lambda tmp: torch.save(data, tmp))
    return reference


def _base_row(task: EditTask, record: FactRecord) -> dict[str, Any]:
    row = {
        "key": task.key, "fact_id": task.fact_id, "layer": task.layer, "method": task.method,
        "problem": task.problem, "dataset": record.source, "status": "failed", "reason": "",
    }
    if task.co_facts:  # batched edits name their co-edited facts; single edits stay as they were
        row["co_facts"] = json.dumps(list(task.co_facts))
    return row


def co_edit_requests(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: EditTask,
    records: Mapping[str, FactRecord], config: EvaluationConfig,
) -> tuple[EditRequest, ...]:
    """The requests of ``task.co_facts``, each built as the edited fact's is: the problem's
    target (o_noise computed on the unedited model for Tracing Reversal) and input (the fact's
    own subject noise for Fact Forcing). A co-edited fact the problem does not apply to fails
    the task with its reason."""
    problem = get_problem(task.problem)
    requests = []
    for fact_id in task.co_facts:
        if fact_id not in records:
            raise EditFailed(task.method, f"co-edited fact {fact_id!r} is not among the records")
        co = records[fact_id]
        try:
            o_noise = (
                compute_o_noise(model, tokenizer, co, config.noise)
                if problem.target == "o_noise" else None
            )
            target = edit_target(problem, co, o_noise)
            noise = (
                noise_for_request(model, tokenizer, co, config.noise)
                if problem.noised_input else None
            )
            requests.append(EditRequest(co.prompt, co.subject, target, problem.direction, noise))
        except (ProblemNotApplicable, TokenizationError, ValueError) as err:
            raise EditFailed(task.method, f"co-edited fact {fact_id}: {err}") from err
    return tuple(requests)


def run_fact(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    covariance: Any,
    record: FactRecord,
    tasks: Sequence[EditTask],
    hparams: Mapping[tuple[str, str], Any],
    config: EvaluationConfig,
    on_row: Callable[[dict], None],
    cache_dir: Path | None = None,
    context: str = "",
    records: Mapping[str, FactRecord] | None = None,
) -> None:
    """Edit ``record`` for each task and report one row per task through ``on_row``.

    ``records`` (by fact id) supplies the facts that tasks co-edit (``EditTask.co_facts``).
    """
    if not tasks:
        return
    problems = sorted({t.problem for t in tasks})
    try:
        pre = _pre_edit(model, tokenizer, record, problems, config, cache_dir, context)
    except (TokenizationError, ProblemNotApplicable, ValueError) as err:
        for task in tasks:
            on_row({**_base_row(task, record), "reason": f"pre-edit evaluation: {err}"})
        return
    probes = build_probes(tokenizer, record, pre.o_noise, noised="fact_forcing" in problems)
    reference = (
        _kl_reference(model, tokenizer, record, config.neighborhood_kl, cache_dir, context)
        if config.neighborhood_kl.enabled else None
    )
    # A fact's tasks share their co-edits (drawn per fact), built once per problem: the
    # unedited model gives every task the same targets and noise.
    built: dict[tuple[str, tuple[str, ...]], tuple[EditRequest, ...]] = {}

    def co_requests_for(task: EditTask) -> tuple[EditRequest, ...]:
        key = (task.problem, task.co_facts)
        if key not in built:
            built[key] = co_edit_requests(model, tokenizer, task, records or {}, config)
        return built[key]

    for task in tasks:
        on_row(_run_task(model, tokenizer, covariance, record, task, hparams[(task.method, task.problem)],
                         config, pre, probes, reference, co_requests_for))


def _run_task(
    model, tokenizer, covariance, record, task, hparams, config, pre, probes, reference=None,
    co_requests_for: Callable[[EditTask], tuple[EditRequest, ...]] | None = None,
) -> dict[str, Any]:
    row = _base_row(task, record)
    row["hparams"] = json.dumps(hparams.to_dict(), sort_keys=True, default=str)
    problem = get_problem(task.problem)
    try:
        target = edit_target(problem, record, pre.o_noise)
        row["target"] = target
        noise = noise_for_request(model, tokenizer, record, config.noise) if problem.noised_input else None
        request = EditRequest(record.prompt, record.subject, target, problem.direction, noise)
        co_requests = co_requests_for(task) if co_requests_for and task.co_facts else ()
        torch.manual_seed(fact_seed(config.seed, task.seed_key))
        with edited(
            model, tokenizer, task.method, request, task.layer, hparams, covariance, co_requests
        ) as result:
            post = probe_probabilities(model, probes, record, config.noise)
            ppl_after = (
                essence_perplexity(model, pre.essence, config.essence_span)
                if pre.essence is not None else None
            )
            kl = (
                nkl.neighborhood_kl(
                    reference.log_probs,
                    nkl.next_token_distributions(
                        model, reference.prompts, config.neighborhood_kl.batch_size
                    ),
                    config.neighborhood_kl,
                )
                if reference is not None else None
            )
        scores = score_edit(
            problem, target_probe_name(problem), pre.probs, post, pre.ppl_before, ppl_after,
            config.neighborhood_target,
        )
        if math.isnan(scores["p_target_post"]):
            raise EditFailed(task.method, "NaN target probability after the edit")
        row.update(scores)
        if kl is not None:
            row["neighborhood_kl"] = kl
        row.update(
            status="ok", seconds=result.seconds, edit_layers=json.dumps(result.layers),
            diagnostics=json.dumps(result.to_record()["diagnostics"]), flags=",".join(result.flags),
        )
    except RestorationError:
        raise
    except ProblemNotApplicable as err:
        row.update(status="skipped", reason=str(err))
    except (EditFailed, TokenizationError, ValueError, RuntimeError, FloatingPointError) as err:
        log.warning("edit %s failed: %s", task.key, err)
        row.update(status="failed", reason=str(err))
    return row
