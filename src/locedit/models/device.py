"""Where the model runs and in which precision (``model.device``, ``model.dtype``), how workers
share the visible GPUs, and the guard that keeps tensors off an implicit CPU.

Rule for code under ``locedit`` (DESIGN.md §7): every tensor factory call (``torch.zeros``,
``torch.tensor``, ``torch.randn``, ...) names its ``device``; tensors that belong to the model's
computation are created on :func:`model_device`, tensors that are deliberately on the CPU (the
seeded subject noise, which is drawn on the CPU so that CPU and GPU runs see the same noise,
then moved; covariance files) say ``device="cpu"``. :func:`implicit_device_guard` enforces the
rule at run time and the CI runs the tracing, editing and metric paths under it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

#: ``model.dtype`` names.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``model.dtype`` (float32, bfloat16, float16; float64 for exactness tests) as a dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ValueError(
            f"unknown model.dtype {name!r}; use one of {', '.join(DTYPES)}"
        ) from None


def resolve_device(setting: str | torch.device | None = "auto") -> torch.device:
    """``model.device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``."""
    if isinstance(setting, torch.device):
        return setting
    text = "auto" if setting is None else str(setting).strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"model.device={setting} but torch sees no CUDA device (torch "
                f"{torch.__version__}); use model.device=auto or cpu"
            )
        index = 0 if text == "cuda" else int(text.split(":", 1)[1])
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"model.device={setting} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        return torch.device("cuda", index)
    raise ValueError(f"unknown model.device {setting!r}; use auto, cpu, cuda or cuda:N")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's weights (its first parameter)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def has_float64(device: torch.device) -> bool:
    """Whether the device computes in float64 (Apple's MPS does not)."""
    return device.type != "mps"


def accumulation_device(device: torch.device) -> torch.device:
    """Where float64 sums (second moments) accumulate: the device when it has float64."""
    return device if has_float64(device) else torch.device("cpu")


def lightning_devices(device: torch.device) -> tuple[str, list[int] | int]:
    """(accelerator, devices) for a ``lightning.Trainer`` that trains where the model lives."""
    if device.type == "cuda":
        return "gpu", [device.index if device.index is not None else torch.cuda.current_device()]
    if device.type == "mps":
        return "mps", 1
    return "cpu", 1


#: Whether :func:`attention_without_cudnn` may leave cuDNN attention on (a benchmark switch).
ALLOW_CUDNN_ATTENTION = False


@contextmanager
def attention_without_cudnn() -> Iterator[None]:
    """Scaled-dot-product attention on every backend but cuDNN inside the block.

    torch prefers cuDNN attention for bfloat16/float16 on Hopper GPUs (H100, H200). cuDNN
    builds an execution plan for every new shape, and tracing runs hundreds of shapes per fact
    (the batch grows layer by layer, the query length changes with each token); and its
    backward pass with an explicit attention mask has returned NaN gradients (pytorch/pytorch
    #196678), where v*/z* and FT differentiate through masked attention. float32 never runs
    on cuDNN, so this keeps bfloat16 on the kernels float32 uses (flash, memory-efficient,
    math). The CPU runs the same kernels either way.
    """
    if ALLOW_CUDNN_ATTENTION:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
         SDPBackend.OVERRIDEABLE]
    ):
        yield


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose random state ``torch.random.fork_rng`` must fork for ``device``."""
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


# ------------------------------------------------------------------------- GPUs per worker


def visible_gpus(environ: dict | None = None, count: int | None = None) -> list[str]:
    """The GPUs this process may hand to workers, as CUDA_VISIBLE_DEVICES entries."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [item.strip() for item in listed.split(",") if item.strip() and item.strip() != "-1"]
    if count is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(count)]


def assign_gpus(n_workers: int, gpus: Sequence[str], per_worker: float = 1.0) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES value of each of ``n_workers`` local workers (None: CPU only).

    Whole GPUs (``per_worker`` >= 1) go to workers in turn, ``per_worker`` each; a fraction
    (e.g. 0.5: two workers per GPU) packs workers onto GPUs round robin. With more workers
    than whole-GPU slots the surplus shares GPUs round robin too, so no worker is left
    without one. No GPUs: every worker runs on the CPU.
    """
    if n_workers < 1:
        return []
    if not gpus:
        return [None] * n_workers
    if per_worker <= 0:
        raise ValueError("gpus_per_worker must be positive")
    if per_worker >= 1:
        size = int(per_worker)
        if size > len(gpus):
            raise ValueError(f"gpus_per_worker={per_worker} but only {len(gpus)} GPUs are visible")
        slots = [list(gpus[i : i + size]) for i in range(0, len(gpus) - size + 1, size)]
        return [",".join(slots[w % len(slots)]) for w in range(n_workers)]
    return [gpus[w % len(gpus)] for w in range(n_workers)]


@contextmanager
def worker_gpu(visible: str | None) -> Iterator[None]:
    """Set CUDA_VISIBLE_DEVICES for a worker process started inside the block (spawn copies
    the environment), restoring the variable afterwards."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


# ------------------------------------------------------------------------------- the guard

#: Tensor factories that put their result on the default device unless told otherwise.
FACTORIES = (
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.randn, torch.rand, torch.randint, torch.randperm, torch.arange, torch.linspace,
    torch.eye,
)
_PACKAGE = str(Path(__file__).resolve().parents[1])
_HERE = str(Path(__file__).resolve())


class ImplicitDeviceError(RuntimeError):
    """A tensor factory under ``locedit`` without ``device=``: it would land on the CPU while
    the model is on a GPU."""


class _ImplicitDeviceGuard(TorchFunctionMode):
    def __init__(self, package: str, exempt: Sequence[str]) -> None:
        super().__init__()
        self.package = package
        self.exempt = tuple(exempt)
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None and not _keeps_device(func, args):
            where = _caller_in(self.package, self.exempt)
            if where is not None:
                name = getattr(func, "__name__", str(func))
                message = f"torch.{name}(...) without device= at {where}"
                self.violations.append(message)
                raise ImplicitDeviceError(message)
        return func(*args, **kwargs)


def _keeps_device(func, args) -> bool:
    """``torch.as_tensor``/``torch.tensor`` of a tensor keep (or copy) its device."""
    return func in (torch.as_tensor, torch.tensor) and bool(args) and isinstance(args[0], torch.Tensor)


#: torch's own dispatch of ``__torch_function__`` (Python-level wrappers), never the caller.
_DISPATCH = (f"{os.sep}torch{os.sep}overrides.py", f"{os.sep}torch{os.sep}utils{os.sep}_device.py")


def _caller_in(package: str, exempt: Sequence[str]) -> str | None:
    """file:line of the frame that called the factory, if it lies in ``package``.

    Only the direct caller is blamed: a factory that torch (Adam's step counter), transformers
    (a sliding-window cache) or Lightning call inside a locedit call is theirs to place, even
    though a locedit frame lies further down the stack.
    """
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename == _HERE or frame.f_code.co_filename.endswith(_DISPATCH)
    ):
        frame = frame.f_back
    if frame is None:
        return None
    filename = frame.f_code.co_filename
    if filename.startswith(package) and not any(e in filename for e in exempt):
        return f"{filename}:{frame.f_lineno}"
    return None


@contextmanager
def implicit_device_guard(
    package: str = _PACKAGE, exempt: Sequence[str] = ()
) -> Iterator[_ImplicitDeviceGuard]:
    """Raise :class:`ImplicitDeviceError` at any tensor factory called from ``package`` (the
    ``locedit`` sources) without ``device=`` inside the block.

    On a CPU-only machine a forgotten ``device=`` is invisible (the default device is the
    model's device); on a GPU it is a device-mismatch error in the middle of a sweep. Factory
    calls made by torch, transformers or Lightning themselves are not checked (also when
    locedit called them), nor calls that copy an existing tensor.
    """
    guard = _ImplicitDeviceGuard(package, exempt)
    with guard:
        yield guard
