"""Representation zeroing (paper App. B): the localization method the original code got wrong.

Run the clean prompt, set the ``kind`` outputs at the subject tokens to zero for the window of
layers centred on l, and read how much of p(o_true | s, r) is deleted. Every window (and the
last-subject-token variant) is one row of a single batched forward pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.data.records import FactRecord
from locedit.models.architecture import n_layers
from locedit.models.device import model_device
from locedit.models.hooks import window_layers
from locedit.tracing.patching import (
    check_kind,
    encode_fact,
    patched_components,
    target_probs_from_final,
)
from locedit.tracing.results import ZeroingResult


@torch.no_grad()
def zero_fact(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    fact: FactRecord,
    *,
    kind: str = "mlp",
    window: int = 5,
    min_denominator: float = 0.01,
) -> ZeroingResult:
    """Zeroing effects of one fact for every window centre.

    Rows of the batch: 0..L-1 zero all subject tokens in window l; L..2L-1 zero only the last
    subject token; row 2L is the clean run (p_clean).
    """
    kind = check_kind(kind)
    inp = encode_fact(tokenizer, fact)
    total = n_layers(model)
    subject = list(range(inp.subject_start, inp.subject_end))
    spans = [window_layers(layer, window, total) for layer in range(total)]
    device = model_device(model)

    def patch_for(layer: int):
        rows = torch.tensor(
            [centre for centre, span in enumerate(spans) if layer in span], device=device
        )

        def fn(hidden: torch.Tensor) -> torch.Tensor:
            patched = hidden.clone()
            patched[rows[:, None], subject] = 0.0
            patched[rows + total, inp.last_subject] = 0.0
            return patched

        return fn

    with torch.no_grad(), patched_components(model, kind, {j: patch_for(j) for j in range(total)}):
        hidden = model.base_model(input_ids=inp.ids(2 * total + 1, device)).last_hidden_state
    probs = target_probs_from_final(model, hidden[:, inp.target_positions], inp.target_ids).cpu().numpy()
    return ZeroingResult(
        **inp.result_fields(kind, window),
        p_clean=float(probs[2 * total]),
        p_zeroed=np.asarray(probs[:total], dtype=np.float64),
        p_zeroed_last=np.asarray(probs[total : 2 * total], dtype=np.float64),
        min_denominator=float(min_denominator),
    )
