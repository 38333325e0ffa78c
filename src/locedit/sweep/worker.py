"""Run the edits of one fact: pre-edit probabilities once, then every (method, problem, layer).

A failed edit becomes a row with ``status = failed`` and its reason; only a failed weight
restoration stops the sweep, because the model could no longer be trusted.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.data.records import FactRecord
from locedit.editing import EditFailed, EditRequest, edited
from locedit.editing.deltas import weight_deltas_by_group
from locedit.editing.editor import optimise_together
from locedit.editing.methods import get_method
from locedit.editing.types import GroupedEdit
from locedit.metrics import neighborhood_kl as nkl
from locedit.metrics.evaluation import (
    EssenceTexts,
    build_probes,
    copied_essence_perplexity,
    copied_probe_probabilities,
    essence_perplexity,
    noise_for_request,
    probe_probabilities,
    sample_essence_texts,
    score_edit,
    target_probe_name,
)
from locedit.models.noise import fact_seed
from locedit.models.snapshot import RestorationError, preserved_weights
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


@dataclass
class _Fact:
    """What every edit of one fact shares: the record, the unedited model's values, the probes,
    the neighbourhood KL reference and the fact's co-edited requests (built once per problem:
    the unedited model gives every task the same targets and noise)."""

    record: FactRecord
    pre: PreEdit
    probes: Any
    reference: KLReference | None
    co_requests_for: Callable[[EditTask], tuple[EditRequest, ...]]


def _prepare_fact(
    model, tokenizer, record: FactRecord, problems: Sequence[str], config: EvaluationConfig,
    cache_dir: Path | None, context: str, records: Mapping[str, FactRecord] | None,
) -> _Fact:
    pre = _pre_edit(model, tokenizer, record, problems, config, cache_dir, context)
    probes = build_probes(tokenizer, record, pre.o_noise, noised="fact_forcing" in problems)
    reference = (
        _kl_reference(model, tokenizer, record, config.neighborhood_kl, cache_dir, context)
        if config.neighborhood_kl.enabled else None
    )
    built: dict[tuple[str, tuple[str, ...]], tuple[EditRequest, ...]] = {}

    def co_requests_for(task: EditTask) -> tuple[EditRequest, ...]:
        key = (task.problem, task.co_facts)
        if key not in built:
            built[key] = co_edit_requests(model, tokenizer, task, records or {}, config)
        return built[key]

    return _Fact(record, pre, probes, reference, co_requests_for)


def run_facts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    covariance: Any,
    facts: Sequence[FactRecord],
    tasks: Sequence[EditTask],
    hparams: Mapping[tuple[str, str], Any],
    config: EvaluationConfig,
    on_row: Callable[[dict], None],
    cache_dir: Path | None = None,
    context: str = "",
    records: Mapping[str, FactRecord] | None = None,
    group_size: int = 1,
) -> None:
    """Edit the ``facts`` for each of their tasks and report one row per task through
    ``on_row``; each fact's pre-edit values are computed once (and cached in ``cache_dir``).

    ``records`` (by fact id) supplies the facts that tasks co-edit (``EditTask.co_facts``).
    ``group_size`` > 1 optimises up to that many edits of one method and problem as one batch
    (their v*/z*, or their finetuning: :func:`task_groups`), of one fact's layers and of
    several facts alike; a group's edits of one fact are then measured in the same forwards
    (:func:`_run_group`). The rows are the same, to rounding (issue 28). Tasks run in the
    order given, grouped by (method, problem) where they first appear.
    """
    by_id = {record.fact_id: record for record in facts}
    unknown = sorted({t.fact_id for t in tasks} - set(by_id))
    if unknown:
        raise ValueError(f"tasks of facts not given to run_facts: {unknown[:5]}")
    prepared: dict[str, _Fact] = {}
    for fact_id in dict.fromkeys(t.fact_id for t in tasks):
        mine = [t for t in tasks if t.fact_id == fact_id]
        try:
            prepared[fact_id] = _prepare_fact(
                model, tokenizer, by_id[fact_id], sorted({t.problem for t in mine}), config,
                cache_dir, context, records,
            )
        except (TokenizationError, ProblemNotApplicable, ValueError) as err:
            for task in mine:
                on_row({**_base_row(task, by_id[fact_id]), "reason": f"pre-edit evaluation: {err}"})
    pairs = list(dict.fromkeys((t.method, t.problem) for t in tasks))
    live = sorted(
        (t for t in tasks if t.fact_id in prepared), key=lambda t: pairs.index((t.method, t.problem))
    )
    for group in task_groups(live, group_size):
        given, shared = _group_vstars(model, tokenizer, covariance, group, hparams, config, prepared)
        for fact_id in dict.fromkeys(task.fact_id for task in group):
            fact = prepared[fact_id]
            members = [i for i, task in enumerate(group) if task.fact_id == fact_id]
            if len(members) > 1:
                for row in _run_group(model, tokenizer, covariance, fact, [group[i] for i in members],
                                      hparams, config, [given[i] for i in members], shared):
                    on_row(row)
                continue
            task = group[members[0]]
            on_row(_run_task(model, tokenizer, covariance, fact, task,
                             hparams[(task.method, task.problem)], config, given[members[0]],
                             shared))


def task_groups(tasks: Sequence[EditTask], size: int) -> list[list[EditTask]]:
    """Consecutive tasks of one (method, problem) whose method can optimise independent edits
    together (v*/z*, finetuning), at most ``size`` to a group (their optimisations run as one
    batch), of one fact or several; every other task alone. The order of the tasks, and so of
    the rows, is kept."""
    groups: list[list[EditTask]] = []
    for task in tasks:
        last = groups[-1] if groups else None
        if (
            size > 1 and last and len(last) < size
            and (last[0].method, last[0].problem) == (task.method, task.problem)
            and get_method(task.method).groupable
        ):
            last.append(task)
        else:
            groups.append([task])
    return groups


def _group_vstars(
    model, tokenizer, covariance, group: Sequence[EditTask], hparams, config,
    facts: Mapping[str, _Fact],
) -> tuple[list[tuple], float]:
    """The optimisations of a group's edits (v*/z*, finetuning) run as one batch
    (:func:`locedit.editing.editor.optimise_together`),
    and each edit's share of its time. A task whose request cannot be built gets none and
    meets the same error in :func:`_run_task`; a batch that cannot run (e.g. out of memory)
    leaves every task to optimise its own."""
    nothing: list[tuple] = [()] * len(group)
    if len(group) == 1:
        return nothing, 0.0
    edits, members = [], []
    for index, task in enumerate(group):
        try:
            request, co_requests = _task_request(model, tokenizer, facts[task.fact_id], task, config)
        except (ProblemNotApplicable, EditFailed, ValueError, RuntimeError):
            continue
        members.append(index)
        edits.append(GroupedEdit(
            task.method, request, task.layer, hparams[(task.method, task.problem)], co_requests
        ))
    start = time.perf_counter()
    try:
        found = optimise_together(model, tokenizer, edits, covariance)
    except (EditFailed, ValueError, RuntimeError) as err:
        log.warning("the batched optimisation of %d edits failed (%s): one at a time",
                    len(edits), err)
        return nothing, 0.0
    for index, vstars in zip(members, found, strict=True):
        nothing[index] = vstars
    return nothing, (time.perf_counter() - start) / max(1, len(edits))


def _task_request(
    model, tokenizer, fact: _Fact, task: EditTask, config: EvaluationConfig
) -> tuple[EditRequest, tuple[EditRequest, ...]]:
    """The task's request (the problem's target and input) and its co-edited requests."""
    problem = get_problem(task.problem)
    record = fact.record
    target = edit_target(problem, record, fact.pre.o_noise)
    noise = noise_for_request(model, tokenizer, record, config.noise) if problem.noised_input else None
    request = EditRequest(record.prompt, record.subject, target, problem.direction, noise)
    co_requests = fact.co_requests_for(task) if task.co_facts else ()
    return request, co_requests


def _run_task(
    model, tokenizer, covariance, fact: _Fact, task: EditTask, hparams, config,
    vstars: tuple = (), shared_seconds: float = 0.0,
) -> dict[str, Any]:
    """One task's row: the edit, measured on the edited model. ``vstars``: its v*/z* from a
    batched run, ``shared_seconds`` its share of that run's time (added to ``seconds``)."""
    row = _begin_row(task, fact.record, hparams)
    with _outcome(row, task):
        with _task_edit(model, tokenizer, covariance, fact, task, hparams, config, vstars, row) as result:
            measured = _measure(model, fact, config)[0]
        _finish_row(row, task, fact.pre, measured, result, config, shared_seconds)
    return row


def _run_group(
    model, tokenizer, covariance, fact: _Fact, tasks: Sequence[EditTask], hparams, config,
    vstars: Sequence[tuple], shared_seconds: float,
) -> list[dict[str, Any]]:
    """A group's rows of one fact (issue 28): each edit made and restored in turn from its
    batched v*/z*, then all of them measured in the same forwards, each through its weight
    change applied in the forward (:func:`locedit.editing.deltas.weight_deltas_by_group`)
    instead of written into the weights. Should that fail (memory), each is measured with its
    weights written."""
    rows, made = [], []
    for task, given in zip(tasks, vstars, strict=True):
        own = hparams[(task.method, task.problem)]
        row = _begin_row(task, fact.record, own)
        rows.append(row)
        with _outcome(row, task):
            with _task_edit(model, tokenizer, covariance, fact, task, own, config, given, row) as result:
                weights = {
                    name: p.detach().clone()
                    for name, p in model.named_parameters() if name in result.changed
                }
            made.append((row, task, result, weights))
    if not made:
        return rows
    params = dict(model.named_parameters())
    try:
        deltas = [
            {name: w - params[name].detach() for name, w in weights.items()}
            for *_, weights in made
        ]
        with weight_deltas_by_group(model, deltas):
            measured = _measure(model, fact, config, len(made))
    except (ValueError, RuntimeError) as err:
        log.warning("measuring %d edits together failed (%s): one at a time", len(made), err)
        measured = []
        for *_, weights in made:
            with preserved_weights(model, list(weights)), torch.no_grad():
                for name, weight in weights.items():
                    params[name].copy_(weight)
                measured.append(_measure(model, fact, config)[0])
    for (row, task, result, _), values in zip(made, measured, strict=True):
        with _outcome(row, task):
            _finish_row(row, task, fact.pre, values, result, config, shared_seconds)
    return rows


def _begin_row(task: EditTask, record: FactRecord, hparams: Any) -> dict[str, Any]:
    row = _base_row(task, record)
    row["hparams"] = json.dumps(hparams.to_dict(), sort_keys=True, default=str)
    return row


@contextmanager
def _outcome(row: dict[str, Any], task: EditTask) -> Iterator[None]:
    """Turn what goes wrong in the body into the row's status: ``skipped`` for a problem that
    does not apply, ``failed`` with the reason; only a failed restoration propagates."""
    try:
        yield
    except RestorationError:
        raise
    except ProblemNotApplicable as err:
        row.update(status="skipped", reason=str(err))
    except (EditFailed, TokenizationError, ValueError, RuntimeError, FloatingPointError) as err:
        log.warning("edit %s failed: %s", task.key, err)
        row.update(status="failed", reason=str(err))


@contextmanager
def _task_edit(
    model, tokenizer, covariance, fact: _Fact, task: EditTask, hparams, config, vstars,
    row: dict[str, Any],
) -> Iterator[Any]:
    """The task's edit, in place for the body (:func:`locedit.editing.edited`); the row gets
    its target."""
    row["target"] = edit_target(get_problem(task.problem), fact.record, fact.pre.o_noise)
    request, co_requests = _task_request(model, tokenizer, fact, task, config)
    torch.manual_seed(fact_seed(config.seed, task.seed_key))
    with edited(
        model, tokenizer, task.method, request, task.layer, hparams, covariance, co_requests,
        vstars,
    ) as result:
        yield result


@dataclass(frozen=True)
class _Measured:
    """What an edited model is judged on: the probes, the essence perplexity, the NKL."""

    post: dict[str, float]
    ppl_after: float | None
    kl: float | None


def _measure(model, fact: _Fact, config: EvaluationConfig, copies: int = 1) -> list[_Measured]:
    """The post-edit measurements of the model as it is, or of ``copies`` edited models in
    the same forwards (see :func:`_run_group`)."""
    one = copies == 1
    probes, record, pre, reference = fact.probes, fact.record, fact.pre, fact.reference
    posts = (
        [probe_probabilities(model, probes, record, config.noise)] if one
        else copied_probe_probabilities(model, probes, record, config.noise, copies)
    )
    ppls: list[float | None] = [None] * copies
    if pre.essence is not None:
        ppls = (
            [essence_perplexity(model, pre.essence, config.essence_span)] if one
            else copied_essence_perplexity(model, pre.essence, config.essence_span, copies)
        )
    kls: list[float | None] = [None] * copies
    if reference is not None:
        batch = config.neighborhood_kl.batch_size
        distributions = (
            [nkl.next_token_distributions(model, reference.prompts, batch)] if one
            else nkl.copied_next_token_distributions(model, reference.prompts, batch, copies)
        )
        kls = [
            nkl.neighborhood_kl(reference.log_probs, log_probs, config.neighborhood_kl)
            for log_probs in distributions
        ]
    return [_Measured(*values) for values in zip(posts, ppls, kls, strict=True)]


def _finish_row(row, task, pre, measured: _Measured, result, config, shared_seconds) -> None:
    """The row's scores (Sec. 3.4, App. C) and the edit's record."""
    problem = get_problem(task.problem)
    scores = score_edit(
        problem, target_probe_name(problem), pre.probs, measured.post, pre.ppl_before,
        measured.ppl_after, config.neighborhood_target,
    )
    if math.isnan(scores["p_target_post"]):
        raise EditFailed(task.method, "NaN target probability after the edit")
    row.update(scores)
    if measured.kl is not None:
        row["neighborhood_kl"] = measured.kl
    row.update(
        status="ok", seconds=result.seconds + shared_seconds, edit_layers=json.dumps(result.layers),
        diagnostics=json.dumps(result.to_record()["diagnostics"]), flags=",".join(result.flags),
    )
