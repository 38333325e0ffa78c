"""Shared fixtures: a real GPT-2 tokenizer and tiny random models, all offline."""

from __future__ import annotations

import os

import pytest
import torch

from locedit.testing import gpt2_tokenizer, tiny_model

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture
def gpt2_model():
    return tiny_model("gpt2", n_layers=4)
