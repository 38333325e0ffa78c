"""Weight snapshots that make an edited model impossible to leak out of a ``with`` block."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class RestorationError(RuntimeError):
    """The weights after restoration differ from the snapshot: the model must not be used."""


class WeightSnapshot:
    """Exact copies of named parameters, restorable and verifiable bit for bit.

    The copies stay on the parameters' device (a deliberate choice: restoring is a device-local
    copy; GPT-J's largest edited matrix is 128 MiB in bfloat16) and in their dtype; equality is
    checked on the raw bits, so -0.0 vs 0.0 or a NaN payload count as changes in every dtype.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        params = dict(model.named_parameters())
        self.model = model
        self.saved: dict[str, torch.Tensor] = {}
        for name in names:
            if name not in params:
                raise KeyError(f"parameter {name!r} not in model")
            self.saved[name] = params[name].detach().clone()

    def changed(self) -> list[str]:
        """Names of parameters that differ from the snapshot now."""
        params = dict(self.model.named_parameters())
        return [n for n, saved in self.saved.items() if not same_bits(params[n].detach(), saved)]

    def restore(self) -> None:
        """Copy the saved values back and verify bit-identity."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, saved in self.saved.items():
                params[name].copy_(saved)
        still_changed = self.changed()
        if still_changed:
            raise RestorationError(f"restoration failed for {still_changed}")


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bits (shape, dtype, device and every byte)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    bits = _BITS.get(a.element_size())
    if bits is None or a.is_complex() or a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


@contextmanager
def preserved_weights(model: nn.Module, names: Iterable[str]) -> Iterator[WeightSnapshot]:
    """Snapshot ``names`` on entry; restore and verify on exit, also when the body raises."""
    snapshot = WeightSnapshot(model, names)
    try:
        yield snapshot
    finally:
        snapshot.restore()


def model_fingerprint(model: nn.Module) -> str:
    """A short content hash of the model's config and every weight's bytes (for cache keys).

    SHA-256 runs at about 2 GB/s with the CPU's hashing instructions, so hashing every byte
    (about a second for Gemma-3-270M) is cheaper than summarising tensors in float64, and no
    edit, however small, can collide with the original.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()[:16]
