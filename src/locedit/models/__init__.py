"""Models: the architecture table and discovery, loading (hub id, folder, bundled GGUF) and weight safety."""

from locedit.models.architecture import (
    ARCHITECTURES,
    ArchSpec,
    UnsupportedArchitectureError,
    arch_spec,
    component_module,
    down_proj_weight,
    n_layers,
)
from locedit.models.discovery import ArchitectureCheckError, discover_spec, validate_spec
from locedit.models.loading import BUNDLED, ModelLoadError, load_model
from locedit.models.snapshot import (
    RestorationError,
    WeightSnapshot,
    model_fingerprint,
    preserved_weights,
)

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ArchitectureCheckError",
    "BUNDLED",
    "ModelLoadError",
    "RestorationError",
    "UnsupportedArchitectureError",
    "WeightSnapshot",
    "arch_spec",
    "component_module",
    "discover_spec",
    "down_proj_weight",
    "load_model",
    "model_fingerprint",
    "n_layers",
    "preserved_weights",
    "validate_spec",
]
