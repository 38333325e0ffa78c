"""Shared fixtures: a real GPT-2 tokenizer and tiny random models, all offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from locedit.testing import gpt2_tokenizer, tiny_model

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def tok():
    """The GPT-2 tokenizer, per test module (the editing tests' name for it)."""
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def store(tmp_path_factory, tok):
    """A small key-statistics store shared by one module's ROME/MEMIT tests."""
    from locedit.editing import CorpusSpec, CovarianceStore

    return CovarianceStore(
        tmp_path_factory.mktemp("stats"), CorpusSpec(n_samples=16, sample_length=24), tok
    )


@pytest.fixture
def gpt2_model():
    return tiny_model("gpt2", n_layers=4)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared_data(path: Path = SHARED_DATA) -> Path:
    """``../shared/data``: skipped on a developer machine without it, a failure in CI (``CI=true``),
    where a missing data folder means the checkout is wrong, not that the test does not apply."""
    if not path.exists():
        message = f"shared data folder {path} not present"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"{message} (CI=true: it must be checked out next to the repository)")
        pytest.skip(message)
    return path


@pytest.fixture
def shared_data() -> Path:
    return require_shared_data()
