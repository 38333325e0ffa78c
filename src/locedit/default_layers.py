"""The originals' default edit layers, scaled to a model's depth: plain arithmetic, no torch.

It lives outside :mod:`locedit.editing` (whose package imports torch) so that the analysis, which
must run without torch, can name the layer each method edits by default (the random-location
baseline compares it with the tracing-chosen and a random layer). :func:`locedit.editing.default_layer`
checks the method name against the registry and calls :func:`scaled_default_layer`.
Layers are 0-based; the paper numbers them from 1 (GPT-J's ROME default "layer 6" is index 5).
"""

from __future__ import annotations

import math

#: The originals' default edit layers (0-based): ROME on GPT-J is layer 5 of 28 (the paper's
#: "layer 6", also where it tunes every method), on GPT2-XL layer 17 of 48 (the paper's 18).
ORIGINAL_DEFAULT_LAYERS: dict[int, int] = {28: 5, 48: 17}


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even)."""
    return int(math.floor(value + 0.5))


def scaled_default_layer(n_layers: int) -> int:
    """The default edit layer of a model with ``n_layers`` layers (Meng et al. 2022; Hase et al.
    2023 App. A tune and report every method at it).

    GPT-J (28 layers) and GPT2-XL (48) get the originals' layers exactly. Other depths get the
    mean relative position of those two choices (5/27 and 17/47 of the way up, about 0.27),
    rounded: 5 of 18 layers for Gemma-3-270M, 8 of 30 for SmolLM2-135M.
    """
    if n_layers in ORIGINAL_DEFAULT_LAYERS:
        return ORIGINAL_DEFAULT_LAYERS[n_layers]
    if n_layers < 1:
        raise ValueError("a model needs at least one layer")
    fractions = [layer / (depth - 1) for depth, layer in ORIGINAL_DEFAULT_LAYERS.items()]
    return round_half_up(sum(fractions) / len(fractions) * (n_layers - 1))
