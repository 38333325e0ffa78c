"""Second moment of MLP keys, E[k k^T], and the solves ROME and MEMIT need from it.

The key k is the *input* of the MLP down-projection at every token of the corpus. Statistics
accumulate in float64 and are cached as files keyed by everything they depend on: model
fingerprint, corpus identity, layer, sample count and storage dtype (ROME's in-memory cache
keyed only model and layer and silently reused stale statistics, DESIGN.md §8).
"""

from __future__ import annotations

import copy
import json
import logging
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from locedit.editing import corpus as corpus_module
from locedit.editing.corpus import CorpusSpec, corpus_token_ids, generate_context_templates
from locedit.models import hooks
from locedit.models.architecture import (
    arch_spec,
    as_out_in,
    check_layer,
    down_proj_weight,
    get_module,
)
from locedit.models.device import accumulation_device, model_device
from locedit.models.scoring import pad_right
from locedit.models.snapshot import model_fingerprint
from locedit.versioning import code_version, content_key

log = logging.getLogger(__name__)

STATS_SCHEMA_VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SingularCovarianceError(ValueError):
    """The key covariance could not be solved reliably even with the largest ridge."""


def down_proj_module(model: nn.Module, layer: int) -> nn.Module:
    return get_module(model, arch_spec(model).mlp_down.format(check_layer(model, layer)))


def second_moments(
    model: nn.Module,
    rows: Sequence[Sequence[int]],
    layers: Iterable[int],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = True,
    skip_first: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """Sum of k k^T (float64) per layer over the non-padding tokens of ``rows``, and the count.

    ``skip_first`` leaves out each row's first token, the BOS every corpus row starts with:
    BOS is never a subject token, and its outsized activations in many models (attention
    sinks) would otherwise dominate E[k k^T]. One pass over the corpus serves all layers; the
    forward stops after the highest one.
    """
    layers = sorted(set(layers))
    if not layers:
        return {}, 0
    sums = {layer: None for layer in layers}
    state = {"mask": None}

    device = model_device(model)
    # float64 sums on the model's device where it has float64 (CUDA), else on the CPU.
    accumulate = accumulation_device(device)

    def capture(layer, inputs, _output):
        keys = inputs[0][state["mask"]].to(accumulate, torch.float64)
        product = keys.T @ keys
        sums[layer] = product if sums[layer] is None else sums[layer] + product

    modules = {layer: down_proj_module(model, layer) for layer in layers}
    count = 0
    with hooks.watched(modules, capture):
        batches = range(0, len(rows), batch_size)
        for start in tqdm(batches, desc="key second moments", disable=not progress, leave=False):
            ids, mask = pad_right(rows[start : start + batch_size], pad_id, device)
            keep = mask.bool()
            if skip_first:
                keep[:, 0] = False
            state["mask"] = keep
            count += int(keep.sum())
            hooks.run_until(
                lambda ids=ids, mask=mask: model.base_model(
                    input_ids=ids, attention_mask=mask, use_cache=False
                ),
                modules[layers[-1]],
            )
    return {layer: value for layer, value in sums.items()}, count


class CovarianceSolver:
    """Solves (C + ridge I) x = b in float64 through a cached Cholesky factor.

    ``ridge`` is relative to the mean eigenvalue trace(C)/d. It starts at ``ridge`` and is raised
    (1e-10, 1e-8, ..., 1e-2) only when the Cholesky factorisation fails or the condition estimate
    (ratio of the factor's extreme diagonal entries, squared) exceeds ``max_condition``: a
    rank-deficient covariance gets a logged ridge, never a silent garbage solve. Every solve
    checks its relative residual.
    """

    LADDER = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)

    def __init__(
        self,
        moment: torch.Tensor,
        ridge: float = 0.0,
        max_condition: float = 1e10,
        tolerance: float = 1e-6,
    ) -> None:
        matrix = moment.double()
        if not bool(torch.isfinite(matrix).all()):
            raise SingularCovarianceError("the key covariance contains NaN or Inf")
        self.dim = int(matrix.shape[0])
        self.scale = float(torch.trace(matrix)) / self.dim
        if not self.scale > 0:
            raise SingularCovarianceError("the key covariance has a non-positive trace")
        self.tolerance = tolerance
        candidates = [ridge] + [r for r in self.LADDER if r > ridge]
        for candidate in candidates:
            regularised = matrix + candidate * self.scale * torch.eye(
                self.dim, dtype=torch.float64, device=matrix.device
            )
            factor, info = torch.linalg.cholesky_ex(regularised)
            if int(info) != 0:
                continue
            diagonal = factor.diagonal()
            condition = float((diagonal.max() / diagonal.min()) ** 2)
            if condition <= max_condition:
                break
        else:
            raise SingularCovarianceError(
                f"key covariance ill-conditioned even with ridge {candidates[-1]:g} x mean eigenvalue"
            )
        if candidate != ridge:
            log.warning(
                "key covariance is singular or ill-conditioned; added ridge %.0e x mean eigenvalue "
                "(condition estimate %.2e)",
                candidate,
                condition,
            )
        self.ridge = candidate
        self.condition = condition
        self.matrix = regularised
        self.factor = factor

    def to(self, device: torch.device) -> CovarianceSolver:
        """The same factorisation on ``device`` (a copy; this solver is unchanged)."""
        moved = copy.copy(self)
        moved.matrix, moved.factor = self.matrix.to(device), self.factor.to(device)
        return moved

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """x with (C + ridge) x = rhs, float64 on ``rhs``'s device; raises when the residual
        check fails."""
        b = rhs.to(self.factor.device, torch.float64).reshape(self.dim, -1)
        x = torch.cholesky_solve(b, self.factor)
        residual = float((self.matrix @ x - b).norm() / b.norm().clamp_min(1e-300))
        if not residual <= self.tolerance:
            raise SingularCovarianceError(
                f"covariance solve residual {residual:.2e} > {self.tolerance:g}"
            )
        return x.reshape(rhs.shape).to(rhs.device)


def _nbytes(solver: CovarianceSolver) -> int:
    return sum(t.element_size() * t.nelement() for t in (solver.matrix, solver.factor))


class CovarianceStore:
    """Cached key statistics (and context templates) under one directory.

    ``get(model, layer)`` returns E[k k^T] as float64, computing and saving it when missing and
    a corpus and tokenizer were given (the ``stats`` stage fills the cache ahead of time).
    Model fingerprints are memoised per model object: they hash every weight, and an edit
    inside :func:`locedit.editing.edited` restores the weights before the next lookup.
    """

    def __init__(
        self,
        directory: Path | str,
        corpus: CorpusSpec | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        compute_missing: bool = True,
        max_cached: int = 12,
        max_cached_bytes: int = 24 << 30,
        moment_budget_bytes: int = 16 << 30,
    ) -> None:
        self.directory = Path(directory)
        self.corpus = corpus or CorpusSpec()
        self.tokenizer = tokenizer
        self.compute_missing = compute_missing
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._solvers: OrderedDict = OrderedDict()
        self._max_cached = max_cached
        # GPT-J's 16384-wide moment is 2 GiB in float64 and a solver holds two such matrices:
        # the cache is bounded in bytes too, and one corpus pass accumulates at most
        # moment_budget_bytes of float64 sums (more layers: more passes).
        self._max_cached_bytes = max_cached_bytes
        self._moment_budget_bytes = moment_budget_bytes

    @classmethod
    def from_params(
        cls, params, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> CovarianceStore:
        """The store the ``stats`` stage writes: ``<paths.outputs>/stats`` with ``params.stats``."""
        directory = Path(params["paths"]["outputs"]) / "stats"
        corpus = CorpusSpec.from_params(params["stats"], seed=int(params.get("seed", 0)))
        return cls(directory, corpus, tokenizer)

    # -- keys and paths -------------------------------------------------------------------
    def fingerprint(self, model: nn.Module) -> str:
        if model not in self._fingerprints:
            self._fingerprints[model] = model_fingerprint(model)
        return self._fingerprints[model]

    def share_statistics(self, model: nn.Module, source: nn.Module) -> None:
        """Serve ``model`` the statistics and context templates of ``source``.

        For a copy of the same weights in another dtype or on another device (the precision
        benchmark reads the float32 model's statistics for its bfloat16 copy): ``model`` is
        looked up under ``source``'s fingerprint instead of hashing its own weights.
        """
        self._fingerprints[model] = self.fingerprint(source)

    def path(self, model: nn.Module, layer: int) -> Path:
        spec = self.corpus
        return (
            self.directory
            / "covariance"
            / self.fingerprint(model)
            / self.statistics_key(model)
            / f"layer{layer:03d}.n{spec.n_samples}.{spec.dtype}.pt"
        )

    def statistics_key(self, model: nn.Module) -> str:
        """Content key of the statistics: model, corpus identity, count, dtype and the code
        version of this module (and the corpus sampler it imports)."""
        spec = self.corpus
        return content_key(
            "covariance", model=self.fingerprint(model), record=spec.content_id(),
            params={"n_samples": spec.n_samples, "dtype": spec.dtype, "schema": STATS_SCHEMA_VERSION},
            code=(__name__,), length=16,
        )

    # -- statistics ------------------------------------------------------------------------
    def get(self, model: nn.Module, layer: int) -> torch.Tensor:
        """E[k k^T] of the down-projection input at ``layer``, float64 [d_mlp, d_mlp]."""
        path = self.path(model, layer)
        if not path.exists():
            self.ensure(model, [layer])
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if int(payload["schema"]) != STATS_SCHEMA_VERSION:
            raise ValueError(f"{path} has schema {payload['schema']}; rerun `locedit run stats`")
        return payload["mom2"].double()

    def ensure(self, model: nn.Module, layers: Iterable[int], progress: bool = True) -> list[Path]:
        """Compute and save the statistics of every missing layer in one corpus pass."""
        layers = sorted({check_layer(model, layer) for layer in layers})
        missing = [layer for layer in layers if not self.path(model, layer).exists()]
        if missing:
            if not self.compute_missing or self.tokenizer is None:
                raise FileNotFoundError(
                    f"no key statistics for layers {missing} under {self.directory} (model "
                    f"{self.fingerprint(model)}, corpus {self.corpus.content_id()}, key "
                    f"{self.statistics_key(model)}); run "
                    "`locedit run stats` or give CovarianceStore a tokenizer to compute them"
                )
            width = int(as_out_in(model, down_proj_weight(model, missing[0])).shape[1])  # d_mlp
            per_pass = max(1, self._moment_budget_bytes // (8 * width * width))
            for start in range(0, len(missing), per_pass):
                self._compute(model, missing[start : start + per_pass], progress)
        return [self.path(model, layer) for layer in layers]

    def _compute(self, model: nn.Module, layers: list[int], progress: bool) -> None:
        spec = self.corpus
        rows = self._corpus_rows(model)
        log.info("key statistics for layers %s over %d samples (%s)", layers, len(rows), spec.kind)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        sums, count = second_moments(model, rows, layers, spec.batch_size, pad, progress)
        for layer in layers:
            path = self.path(model, layer)
            path.parent.mkdir(parents=True, exist_ok=True)
            mom2 = (sums[layer] / count).to("cpu", _DTYPES[spec.dtype])
            meta = {
                "schema": STATS_SCHEMA_VERSION,
                "model_fingerprint": self.fingerprint(model),
                "layer": layer,
                "module": arch_spec(model).mlp_down.format(layer),
                "corpus": spec.to_dict(),
                "corpus_id": spec.content_id(),
                "n_samples": len(rows),
                "n_tokens": count,
                "dtype": spec.dtype,
            }
            tmp = path.with_suffix(".tmp")
            torch.save({"mom2": mom2, "count": count, "schema": STATS_SCHEMA_VERSION}, tmp)
            tmp.replace(path)
            path.with_suffix(".json").write_text(json.dumps(meta, indent=2))

    def _corpus_rows(self, model: nn.Module) -> list[list[int]]:
        """The corpus token ids, cached next to the statistics so they can be inspected."""
        spec = self.corpus
        path = (
            self.directory
            / "corpus"
            / self.fingerprint(model)
            / f"{spec.content_id()}.n{spec.n_samples}.{code_version(corpus_module)}.json"
        )
        if path.exists():
            return json.loads(path.read_text())["token_ids"]
        rows = corpus_token_ids(spec, model, self.tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        path.write_text(json.dumps({"corpus": spec.to_dict(), "token_ids": rows, "texts": texts}))
        return rows

    def solver(self, model: nn.Module, layer: int, ridge: float = 0.0) -> CovarianceSolver:
        """A factorised solver for the layer's covariance on the asking model's device (kept
        for the next edits).

        The cache is keyed by device too: one store may serve the same weights on two devices
        (a CPU reference and its GPU copy share a fingerprint). A factorisation made for one
        device is copied to another rather than factorised again (same numbers).
        """
        # Factorised in float64 where the model runs (CPU for devices without float64).
        device = accumulation_device(model_device(model))
        base = (self.fingerprint(model), self.corpus, layer, ridge)
        key = (*base, device)
        if key in self._solvers:
            self._solvers.move_to_end(key)
            return self._solvers[key]
        elsewhere = next((s for k, s in self._solvers.items() if k[:-1] == base), None)
        if elsewhere is not None:
            solver = elsewhere.to(device)
        else:
            solver = CovarianceSolver(self.get(model, layer).to(device), ridge)
        self._solvers[key] = solver
        while len(self._solvers) > 1 and (
            len(self._solvers) > self._max_cached
            or sum(_nbytes(s) for s in self._solvers.values()) > self._max_cached_bytes
        ):
            self._solvers.popitem(last=False)
        return solver

    # -- context templates -------------------------------------------------------------------
    def context_templates(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        lengths: Sequence[int],
        count: int,
        seed: int,
        top_k: int = 5,
    ) -> list[str]:
        """ROME's context templates for this model, generated once and stored as JSON."""
        lengths = tuple(int(x) for x in lengths)
        name = f"len{'-'.join(map(str, lengths))}.n{count}.seed{seed}.top{top_k}.json"
        path = self.directory / "templates" / self.fingerprint(model) / name
        if path.exists():
            return list(json.loads(path.read_text())["templates"])
        templates = generate_context_templates(model, tokenizer, lengths, count, seed, top_k)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "model_fingerprint": self.fingerprint(model),
                    "lengths": list(lengths),
                    "count": count,
                    "seed": seed,
                    "top_k": top_k,
                    "templates": templates,
                },
                indent=2,
            )
        )
        return templates
