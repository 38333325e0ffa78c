"""The typed fact record every stage passes along, and its JSON-lines file format."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

#: Bump when the on-disk layout of records changes; readers refuse other versions.
SCHEMA_VERSION = 1


#: Whether an edit makes its object more (every problem but one) or less likely (Fact Erasure,
#: paper Sec. 5.1); rewrite and paraphrase scores are read in the same direction (Sec. 3.4).
Direction = Literal["maximize", "minimize"]


class RecordError(ValueError):
    """A record that cannot be used, with the reason it is skipped."""


#: Longest fact id accepted (ids become rows, keys and, hashed, file names).
MAX_ID_LENGTH = 512


def check_fact_id(fact_id: str) -> str:
    """Raise :class:`RecordError` for an id that is empty, too long or holds a control
    character (NUL, newline: they would break rows, logs and tables); else return it. Ids never
    name files directly (:func:`locedit.storage.id_filename`), so ``/`` or ``..`` are allowed."""
    if not isinstance(fact_id, str) or not fact_id.strip():
        raise RecordError(f"empty or non-string fact id {fact_id!r}")
    if len(fact_id) > MAX_ID_LENGTH:
        raise RecordError(f"fact id longer than {MAX_ID_LENGTH} characters ({fact_id[:40]!r}...)")
    if any(ord(c) < 32 or ord(c) == 127 for c in fact_id):
        raise RecordError(f"fact id {fact_id!r} contains a control character")
    return fact_id


def duplicate_ids(ids: Iterable[tuple[str, str]]) -> tuple[str, str, str] | None:
    """The first repeated id among ``(fact_id, where)`` pairs: ``(id, first where, second
    where)``, or None. Two records with one id would be edited, traced and cached as one."""
    seen: dict[str, str] = {}
    for fact_id, where in ids:
        if fact_id in seen:
            return fact_id, seen[fact_id], where
        seen[fact_id] = where
    return None


@dataclass(frozen=True)
class FactRecord:
    """One fact (s, r, o_true) with its counterfactual o_false and evaluation prompts.

    ``prompt`` is the filled-in prompt (s, r) whose next words should be the object.
    """

    fact_id: str
    subject: str
    prompt: str
    target_true: str
    target_new: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def template(self) -> str:
        """The prompt with the subject's first occurrence replaced by ``{}`` (ROME's form)."""
        return self.prompt.replace(self.subject, "{}", 1)

    def validate(self) -> FactRecord:
        """Raise :class:`RecordError` naming the first problem, else return ``self``."""
        check_fact_id(self.fact_id)
        if not self.subject.strip():
            raise RecordError("empty subject")
        if not self.prompt.strip():
            raise RecordError("empty prompt")
        if self.subject not in self.prompt:
            raise RecordError("subject not in prompt")
        if not self.target_true.strip():
            raise RecordError("empty target_true")
        if self.target_new is not None and not self.target_new.strip():
            raise RecordError("empty target_new")
        return self

    def to_json(self) -> dict:
        row = asdict(self)
        row["paraphrase_prompts"] = list(self.paraphrase_prompts)
        row["neighborhood_prompts"] = list(self.neighborhood_prompts)
        return row

    @classmethod
    def from_json(cls, row: dict) -> FactRecord:
        return cls(
            fact_id=str(row["fact_id"]),
            subject=row["subject"],
            prompt=row["prompt"],
            target_true=row["target_true"],
            target_new=row.get("target_new"),
            paraphrase_prompts=tuple(row.get("paraphrase_prompts", ())),
            neighborhood_prompts=tuple(row.get("neighborhood_prompts", ())),
            relation_id=row.get("relation_id"),
            source=row.get("source", ""),
            extra=dict(row.get("extra", {})),
        )


def write_jsonl(path: Path, rows: Iterable[dict], kind: str) -> int:
    """Write rows after a header line carrying the schema version; returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as handle:
        handle.write(json.dumps({"schema_version": SCHEMA_VERSION, "kind": kind}) + "\n")
        for row in rows:
            handle.write(json.dumps(row) + "\n")
            count += 1
    tmp.replace(path)
    return count


def read_jsonl(path: Path, kind: str) -> list[dict]:
    """Read a file written by :func:`write_jsonl`, checking kind and schema version. A missing
    file names the stage that writes it (``outputs/<stage>/...``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run the stage that writes it first "
            f"(`locedit run {path.parent.name}`, or `dvc repro`)"
        )
    with path.open() as handle:
        header = json.loads(handle.readline())
        if header.get("schema_version") != SCHEMA_VERSION or header.get("kind") != kind:
            raise ValueError(
                f"{path}: expected {kind} schema {SCHEMA_VERSION}, found {header}; "
                "rerun the stage that writes it"
            )
        return [json.loads(line) for line in handle if line.strip()]


def write_records(path: Path, records: Iterable[FactRecord]) -> int:
    return write_jsonl(path, (r.to_json() for r in records), kind="facts")


def read_records(path: Path) -> list[FactRecord]:
    """The records of ``path``; a repeated fact id (a hand-edited file) is refused."""
    records = [FactRecord.from_json(row) for row in read_jsonl(path, kind="facts")]
    repeated = duplicate_ids((r.fact_id, f"{path}[{i}]") for i, r in enumerate(records))
    if repeated:
        raise ValueError(
            f"fact id {repeated[0]!r} is used by two records, {repeated[1]} and {repeated[2]}; "
            "every record needs its own id (rerun the prepare stage)"
        )
    return records
