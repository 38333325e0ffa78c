"""Text the covariance statistics and context templates are computed from.

ROME estimated key statistics on 100k Wikipedia samples, which no longer download offline.
The reproducible default is text sampled from the model itself from its own BOS token,
seeded; a local text file (one sample per non-empty line) or an HF dataset are alternatives.
Sampled text is kept as token ids, so it is never re-tokenised (DESIGN.md §7: decoded special
tokens must not be fed back into a tokenizer).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from locedit.models.device import model_device, rng_devices

log = logging.getLogger(__name__)

CorpusKind = Literal["model_samples", "text_file", "hf_dataset"]


@dataclass(frozen=True)
class CorpusSpec:
    """Which corpus, how many samples and how long: everything that changes the statistics."""

    kind: CorpusKind = "model_samples"
    n_samples: int = 200
    sample_length: int = 64
    seed: int = 0
    text_file: str | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_text_field: str = "text"
    hf_revision: str | None = None
    #: Sampling from the model: 0 keeps the full distribution (ancestral sampling).
    top_k: int = 0
    #: Rows per forward when computing the moments.
    batch_size: int = 8
    #: Rows sampled together: each step reads the whole unembedding matrix (671 MB for Gemma's
    #: 262k vocabulary), so wide batches amortise that read.
    sample_batch_size: int = 64
    #: Storage dtype of the second moment; accumulation is always float64.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in ("model_samples", "text_file", "hf_dataset"):
            raise ValueError(
                f"unknown corpus kind {self.kind!r}; use model_samples, text_file or hf_dataset"
            )
        if self.kind == "text_file" and not self.text_file:
            raise ValueError("corpus kind text_file needs stats.text_file (a local text file)")
        if self.kind == "hf_dataset" and not self.hf_dataset:
            raise ValueError("corpus kind hf_dataset needs stats.hf_dataset (a dataset name)")
        if self.n_samples < 1 or self.sample_length < 2:
            raise ValueError("the corpus needs n_samples >= 1 and sample_length >= 2")
        if self.dtype not in ("float32", "float64"):
            raise ValueError("stats dtype must be float32 or float64")

    @classmethod
    def from_params(cls, stats: Mapping[str, Any], seed: int = 0) -> CorpusSpec:
        """From the ``stats`` params group (``conf/stats/default.yaml``)."""
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in dict(stats).items() if k in known and v is not None}
        if "corpus" in stats:
            values["kind"] = stats["corpus"]
        values.setdefault("seed", seed)
        return cls(**values)

    def content_id(self) -> str:
        """Identity of the corpus text (not of the sample count or dtype), for cache paths.

        A text file is identified by its content hash, so an edited file is a new corpus.
        """
        parts: dict[str, Any] = {"kind": self.kind, "length": self.sample_length}
        if self.kind == "model_samples":
            parts.update(seed=self.seed, top_k=self.top_k)
        elif self.kind == "text_file":
            path = Path(self.text_file or "")
            if not path.exists():
                raise FileNotFoundError(f"stats.text_file {path} does not exist")
            parts["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            parts.update(
                name=self.hf_dataset,
                config=self.hf_config,
                split=self.hf_split,
                field=self.hf_text_field,
                revision=self.hf_revision,
                seed=self.seed,
            )
        digest = hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:12]
        return f"{self.kind}-{digest}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token a sample starts from: BOS, or EOS for tokenizers without one (GPT-2)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start samples from")


def sample_from_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    n_samples: int,
    n_new_tokens: int,
    seed: int,
    top_k: int = 0,
    batch_size: int = 8,
    desc: str | None = None,
    suppress: Sequence[int] = (),
) -> list[list[int]]:
    """``n_samples`` continuations of BOS with exactly ``n_new_tokens`` tokens, seeded.

    EOS is suppressed (min_new_tokens) so every sample has the requested length, as are the
    ``suppress`` ids. The global RNG is forked so sampling neither depends on nor disturbs the
    caller's random state.
    """
    start = bos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    out: list[list[int]] = []
    batches = range(0, n_samples, batch_size)
    device = model_device(model)
    # On a GPU the samples come from its generator: seeded and reproducible there, but not the
    # CPU's text (README "GPU and precision").
    with torch.random.fork_rng(devices=rng_devices(device)), torch.no_grad():
        torch.manual_seed(seed)
        for first in tqdm(batches, desc=desc or "sampling", disable=desc is None, leave=False):
            size = min(batch_size, n_samples - first)
            ids = torch.full((size, 1), start, dtype=torch.long, device=device)
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=top_k,
                top_p=1.0,
                temperature=1.0,
                min_new_tokens=n_new_tokens,
                max_new_tokens=n_new_tokens,
                pad_token_id=pad,
                suppress_tokens=list(suppress) or None,
            )
            out.extend(row[1:].tolist() for row in generated)
    return out


def corpus_token_ids(
    spec: CorpusSpec, model: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """The corpus as token-id rows of at most ``sample_length`` tokens, starting with BOS."""
    start = bos_id(tokenizer)
    if spec.kind == "model_samples":
        rows = sample_from_model(
            model,
            tokenizer,
            spec.n_samples,
            spec.sample_length - 1,
            spec.seed,
            spec.top_k,
            spec.sample_batch_size,
            desc="sampling corpus",
        )
        return [[start, *row] for row in rows]
    texts = _texts(spec)
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: spec.sample_length - 1]
        if ids:
            rows.append([start, *ids])
        if len(rows) == spec.n_samples:
            break
    if len(rows) < spec.n_samples:
        log.warning(
            "corpus has only %d usable samples of the %d requested", len(rows), spec.n_samples
        )
    if not rows:
        raise ValueError("the corpus yielded no text")
    return rows


def _texts(spec: CorpusSpec) -> list[str]:
    if spec.kind == "text_file":
        path = Path(spec.text_file or "")
        if not path.exists():
            raise FileNotFoundError(f"stats.text_file {path} does not exist")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "stats.corpus=hf_dataset needs the `datasets` package (pip install datasets) and "
            "the data set in the local HF cache or network access; or use corpus=text_file"
        ) from err
    data = datasets.load_dataset(
        spec.hf_dataset, spec.hf_config, split=spec.hf_split, revision=spec.hf_revision
    )
    data = data.shuffle(seed=spec.seed)
    texts = []
    for row in data:
        text = str(row[spec.hf_text_field]).strip()
        if text:
            texts.append(text)
        if len(texts) >= 4 * spec.n_samples:
            break
    return texts


def generate_context_templates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lengths: tuple[int, ...] = (5, 10),
    count: int = 10,
    seed: int = 0,
    top_k: int = 5,
) -> list[str]:
    """ROME's context templates: "{}" plus ``count`` samples per total length, each + ". {}".

    Samples start from the tokenizer's own BOS (ROME seeded with the text "<|endoftext|>",
    which Gemma splits into 7 tokens, DESIGN.md §7), are decoded with special tokens skipped
    and have braces removed so the template keeps exactly one "{}". A length counts the BOS,
    as ROME's ``max_out_len`` does. Special and added tokens (Gemma's ``<start_of_image>`` is
    not "special" to ``skip_special_tokens``) are never sampled, so the decoded text holds no
    special-token text that would re-tokenise into a control token.
    """
    templates = ["{}"]
    suppress = sorted(set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids))
    for index, length in enumerate(lengths):
        rows = sample_from_model(
            model,
            tokenizer,
            count,
            max(1, length - 1),
            seed + index,
            top_k,
            batch_size=count,
            suppress=suppress,
        )
        for row in rows:
            text = tokenizer.decode(row, skip_special_tokens=True)
            text = text.replace("{", " ").replace("}", " ")
            templates.append(text + ". {}")
    return templates
