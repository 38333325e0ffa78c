"""The noise level of Causal Tracing (paper §3.2): sigma = 3 x std of subject embeddings.

The noise itself (seeded per fact, and the hook that adds it) lives in
:mod:`locedit.models.noise`, since problems, metrics and editing add it too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.data.records import FactRecord, RecordError
from locedit.models.architecture import embedding_module
from locedit.models.tokens import TokenizationError, encode_prompt

log = logging.getLogger(__name__)


def noise_sigma(subject_embeddings: Sequence[torch.Tensor], multiplier: float = 3.0) -> float:
    """sigma = multiplier x std of subject-token input embeddings (ROME's rule, 3 x std).

    ``subject_embeddings`` are the embedding-layer outputs at the subject tokens of each fact;
    the standard deviation is over every coordinate of every subject token together.
    """
    if not subject_embeddings:
        raise ValueError("noise calibration needs at least one fact's subject embeddings")
    flat = torch.cat([e.reshape(-1).double() for e in subject_embeddings])
    return float(multiplier * flat.std())


@dataclass(frozen=True)
class NoiseCalibration:
    """The noise level used for every fact of a run, and where it came from."""

    sigma: float
    multiplier: float
    n_facts: int
    calibrated: bool

    def to_json(self) -> dict:
        return asdict(self)


def subject_embeddings(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: Iterable[FactRecord]
) -> list[torch.Tensor]:
    """Embedding-module outputs at each fact's subject tokens, as they sit in its prompt.

    An embedding lookup only (no forward pass); facts whose subject cannot be located are
    left out with a log line.
    """
    embed = embedding_module(model)
    out = []
    with torch.no_grad():
        for record in records:
            try:
                record.validate()
                encoded = encode_prompt(tokenizer, record.prompt, record.subject)
            except (RecordError, TokenizationError) as err:
                log.info("noise calibration skips fact %s: %s", record.fact_id, err)
                continue
            ids = torch.tensor(
                [encoded.input_ids[encoded.subject_start : encoded.subject_end]],
                device=embed.weight.device,
            )
            out.append(embed(ids)[0].detach())
    return out


def calibrate_noise(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[FactRecord],
    multiplier: float = 3.0,
    override: float | None = None,
) -> NoiseCalibration:
    """sigma = ``multiplier`` x std of the subject-token embeddings over ``records`` (ROME's rule).

    ``override`` (params ``trace.noise_sigma``) replaces the calibrated value.
    """
    if override is not None:
        return NoiseCalibration(float(override), float(multiplier), 0, calibrated=False)
    embeddings = subject_embeddings(model, tokenizer, records)
    return NoiseCalibration(
        noise_sigma(embeddings, multiplier), float(multiplier), len(embeddings), True
    )
