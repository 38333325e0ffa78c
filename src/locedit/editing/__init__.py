"""Model editing behind one interface: ROME, MEMIT, FT-1 and FT-5 (paper Sec. 5.2, App. A), and
EMMET and AlphaEdit (off by default).

Each method is one :class:`EditMethod` entry of :data:`REGISTRY` (:mod:`locedit.editing.methods`).

``edited(model, tokenizer, method, request, layer, hparams, covariance)`` applies an edit for
the duration of a ``with`` block and restores the weights bit for bit afterwards. Layers are
0-based indices into the architecture table, so every supported family works.
"""

from locedit.editing.corpus import CorpusSpec, generate_context_templates
from locedit.editing.covariance import (
    CovarianceSolver,
    CovarianceStore,
    SingularCovarianceError,
    second_moments,
)
from locedit.editing.editor import edited, layers_for, touched_params
from locedit.editing.hparams import (
    AlphaEditHParams,
    EmmetHParams,
    FTHParams,
    HParams,
    MemitHParams,
    RomeHParams,
)
from locedit.editing.layers import (
    PAPER_GRIDS,
    default_layer,
    edit_layers,
    layer_grid,
    layers_needing_covariance,
    sweep_layers,
)
from locedit.editing.methods import (
    ALL_METHODS,
    METHODS,
    REGISTRY,
    EditMethod,
    get_method,
    hparams_for,
    key_stats_methods,
)
from locedit.editing.types import EditFailed, EditRequest, EditResult


def __getattr__(name: str):
    # Lightning takes seconds to import; stages that never finetune should not pay for it.
    if name == "ConstrainedFinetune":
        from locedit.editing.finetune import ConstrainedFinetune

        return ConstrainedFinetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALL_METHODS",
    "METHODS",
    "PAPER_GRIDS",
    "REGISTRY",
    "AlphaEditHParams",
    "ConstrainedFinetune",
    "CorpusSpec",
    "CovarianceSolver",
    "CovarianceStore",
    "EditFailed",
    "EditMethod",
    "EditRequest",
    "EditResult",
    "EmmetHParams",
    "FTHParams",
    "HParams",
    "MemitHParams",
    "RomeHParams",
    "SingularCovarianceError",
    "default_layer",
    "edit_layers",
    "edited",
    "generate_context_templates",
    "get_method",
    "hparams_for",
    "key_stats_methods",
    "layer_grid",
    "layers_for",
    "layers_needing_covariance",
    "second_moments",
    "sweep_layers",
    "touched_params",
]
