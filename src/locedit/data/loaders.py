"""Loaders for CounterFact (ROME and EasyEdit formats), ROME's known facts, and zsRE.

Every loader returns the valid records plus a count of skipped ones by reason; a data set in
which most records are bad raises, since that means the wrong file or format.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from locedit.data.records import FactRecord, RecordError, duplicate_ids

log = logging.getLogger(__name__)

ROME_DATA_URL = "https://rome.baulab.info/data/dsets"


@dataclass(frozen=True)
class DatasetSource:
    """Where a data set lives under the data root and where it is published."""

    relative_path: str
    published: str
    note: str = ""

    def missing_message(self, root: Path) -> str:
        """One line: what is missing (the root itself, or the file in it) and a command that
        fetches it (DVC's ``import-url`` refuses a destination outside the repository, which
        the default ``../shared/data`` is)."""
        target = root / self.relative_path
        what = (
            f"the data root {root} (data.root) does not exist" if not root.is_dir()
            else f"data file {target} is missing"
        )
        if self.published.startswith("https://") and " " not in self.published:
            fetch = f"fetch it with `mkdir -p {target.parent} && curl -fL -o {target} {self.published}`"
        else:
            note = f" ({self.note})" if self.note else ""
            fetch = f"download it from {self.published}{note} to {target}"
        return (
            f"{what}: {fetch}, or point data.root at the folder that holds it "
            "(params.yaml, or `--set data.root=FOLDER`)"
        )

    def refetch_hint(self, root: Path) -> str:
        """What fixes a damaged copy: fetching the published file again."""
        return f"fetch {root / self.relative_path} again from {self.published}"


SOURCES: dict[str, DatasetSource] = {
    "counterfact": DatasetSource("counterfact.json", f"{ROME_DATA_URL}/counterfact.json"),
    "counterfact_easyedit": DatasetSource(
        "counterfact_easyedit",
        "https://github.com/zjunlp/EasyEdit (data release, counterfact/)",
        "the folder with counterfact-edit.json, counterfact-train.json, counterfact-val.json",
    ),
    "known_1000": DatasetSource("known_1000.json", f"{ROME_DATA_URL}/known_1000.json"),
    "zsre": DatasetSource("zsre_mem_eval.json", f"{ROME_DATA_URL}/zsre_mem_eval.json"),
    "zsre_easyedit": DatasetSource(
        "zsre_easyedit_portability/zsre_mend_eval_portability_gpt4.json",
        "https://github.com/zjunlp/EasyEdit (data release, portability/)",
    ),
}


class DatasetError(RuntimeError):
    """A data set that is missing or mostly unusable."""


@dataclass
class LoadResult:
    records: list[FactRecord]
    skipped: Counter = field(default_factory=Counter)
    #: One line per skipped record: ``file[index]: reason``.
    problems: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass(frozen=True)
class RawRow:
    """A record as read, with where it came from (every error names the file and index)."""

    file: str
    index: int
    row: object

    def where(self) -> str:
        return f"{self.file}[{self.index}]"


def _convert_all(
    raw: Iterable[RawRow], convert: Callable[[dict], FactRecord], name: str, max_bad_fraction: float
) -> LoadResult:
    result = LoadResult(records=[])
    total = 0
    where: list[str] = []
    for item in raw:
        total += 1
        try:
            if not isinstance(item.row, dict):
                raise RecordError(f"not a JSON object (a {type(item.row).__name__})")
            result.records.append(convert(item.row).validate())
            where.append(item.where())
            continue
        except RecordError as err:
            reason = str(err)
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            reason = f"malformed record ({type(err).__name__}: {err})"
        result.skipped[reason] += 1
        result.problems.append(f"{item.where()}: {reason}")
    if total and result.n_skipped / total > max_bad_fraction:
        raise DatasetError(
            f"{name}: {result.n_skipped} of {total} records are unusable "
            f"({dict(result.skipped.most_common(3))}; first: {result.problems[0]}); "
            "is this the right file and format?"
        )
    if result.n_skipped:
        log.warning(
            "%s: skipped %d of %d records: %s (first: %s)",
            name, result.n_skipped, total, dict(result.skipped), result.problems[0],
        )
    repeated = duplicate_ids(zip((r.fact_id for r in result.records), where, strict=True))
    if repeated:
        raise DatasetError(
            f"{name}: records {repeated[1]} and {repeated[2]} have the same id {repeated[0]!r}; "
            "each record is edited, traced and cached by its id, so ids must be unique: "
            "fix the data file"
        )
    return result


def _read_json(path: Path, fix: str = "") -> list[RawRow]:
    """The records of a JSON list file; a parse error names the file, line and column, and what
    fixes it (``fix``: e.g. fetching the published file again)."""
    fix = fix or "replace it with the data set's published file"
    try:
        with path.open() as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        shape = (
            "; it looks like JSON lines (one record a line): write the records as one JSON list"
            if err.msg == "Extra data" else ""
        )
        raise DatasetError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            f"expected one JSON list of records{shape}, or {fix}"
        ) from None
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}): the file is damaged or "
            f"not a data set; {fix}"
        ) from None
    if not isinstance(data, list):
        raise DatasetError(
            f"{path}: expected a JSON list of records, found a {type(data).__name__}; {fix}"
        )
    return [RawRow(str(path), index, row) for index, row in enumerate(data)]


def case_id(row: dict) -> int | str:
    """A CounterFact ``case_id`` as an int (also from "12" or 12.0) or a non-empty string id;
    anything else (missing, null, bool, list, 1.5) is refused with the reason."""
    if "case_id" not in row:
        raise RecordError("missing case_id")
    value = row["case_id"]
    if isinstance(value, bool) or value is None:
        raise RecordError(f"case_id must be an integer or a string, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return int(text) if text.lstrip("-").isdigit() else text
    raise RecordError(f"case_id must be an integer or a string, not {type(value).__name__} {value!r}")


def _case_order(item: RawRow) -> tuple:
    """Sort key: numeric ids in order, then string ids, then records without a usable id (they
    are refused with their reason on conversion)."""
    try:
        value = case_id(item.row) if isinstance(item.row, dict) else None
    except RecordError:
        value = None
    if isinstance(value, int):
        return (0, value, "")
    return (1, 0, value) if value is not None else (2, 0, "")


def _require(source: str, root: Path) -> Path:
    path = root / SOURCES[source].relative_path
    if not path.exists():
        raise FileNotFoundError(SOURCES[source].missing_message(root))
    return path


def _rome_counterfact(row: dict) -> FactRecord:
    rewrite = row["requested_rewrite"]
    subject = rewrite["subject"]
    return FactRecord(
        fact_id=f"cf-{row['case_id']}",
        subject=subject,
        prompt=rewrite["prompt"].format(subject),
        target_true=rewrite["target_true"]["str"],
        target_new=rewrite["target_new"]["str"],
        paraphrase_prompts=tuple(row.get("paraphrase_prompts", ())),
        neighborhood_prompts=tuple(row.get("neighborhood_prompts", ())),
        relation_id=rewrite.get("relation_id"),
        source="counterfact",
    )


def _easyedit_counterfact(row: dict) -> FactRecord:
    return FactRecord(
        fact_id=f"cf-{case_id(row)}",
        subject=row["subject"],
        prompt=row["prompt"],
        target_true=row["ground_truth"],
        target_new=row["target_new"],
        paraphrase_prompts=(row["rephrase_prompt"],) if row.get("rephrase_prompt") else (),
        neighborhood_prompts=(row["locality_prompt"],) if row.get("locality_prompt") else (),
        source="counterfact",
        extra={"format": "easyedit"},
    )


def _known(row: dict) -> FactRecord:
    return FactRecord(
        fact_id=f"known-{row['known_id']}",
        subject=row["subject"],
        prompt=row["prompt"],
        target_true=row["attribute"],
        relation_id=row.get("relation_id"),
        source="known_1000",
    )


def _zsre(row: dict) -> FactRecord:
    """zsRE question as prompt; o_true is the gold answer, o_false the ``alt`` answer."""
    question = row["src"]
    return FactRecord(
        fact_id=f"zsre-{row['_index']}",
        subject=row["subject"],
        prompt=question,
        target_true=row["answers"][0],
        target_new=row["alt"],
        paraphrase_prompts=(row["rephrase"],) if row.get("rephrase") else (),
        neighborhood_prompts=(row["loc"].removeprefix("nq question: ") + "?",) if row.get("loc") else (),
        source="zsre",
        extra={"neighborhood_answers": [row.get("loc_ans", "")]},
    )


def load_counterfact(root: Path, max_bad_fraction: float = 0.5) -> LoadResult:
    """CounterFact in ROME's format if present, else EasyEdit's split files, in case_id order."""
    root = Path(root)
    path = root / SOURCES["counterfact"].relative_path
    if path.exists():
        rows = _read_json(path, SOURCES["counterfact"].refetch_hint(root))
        return _convert_all(rows, _rome_counterfact, "counterfact", max_bad_fraction)
    if not (root / SOURCES["counterfact_easyedit"].relative_path).exists():
        raise FileNotFoundError(SOURCES["counterfact"].missing_message(root))  # the canonical one
    folder = root / SOURCES["counterfact_easyedit"].relative_path
    fix = SOURCES["counterfact_easyedit"].refetch_hint(root)
    rows = [row for file in sorted(folder.glob("*.json")) for row in _read_json(file, fix)]
    rows.sort(key=_case_order)
    return _convert_all(rows, _easyedit_counterfact, "counterfact_easyedit", max_bad_fraction)


def load_known(root: Path, max_bad_fraction: float = 0.5) -> LoadResult:
    fix = SOURCES["known_1000"].refetch_hint(Path(root))
    return _convert_all(_read_json(_require("known_1000", Path(root)), fix), _known, "known_1000", max_bad_fraction)


def load_zsre(root: Path, max_bad_fraction: float = 0.5) -> LoadResult:
    """ROME's ``zsre_mem_eval.json`` if present, else EasyEdit's portability subset."""
    root = Path(root)
    name = "zsre" if (root / SOURCES["zsre"].relative_path).exists() else "zsre_easyedit"
    if not (root / SOURCES[name].relative_path).exists():
        raise FileNotFoundError(SOURCES["zsre"].missing_message(root))  # the canonical one
    rows = _read_json(_require(name, root), SOURCES[name].refetch_hint(root))
    for item in rows:
        if isinstance(item.row, dict):
            item.row.setdefault("_index", item.index)
    return _convert_all(rows, _zsre, name, max_bad_fraction)


def load_json_file(path: Path, fmt: str, max_bad_fraction: float = 0.5) -> LoadResult:
    """Load any file in one of the known formats (for user-supplied data)."""
    converters = {
        "rome_counterfact": _rome_counterfact,
        "easyedit_counterfact": _easyedit_counterfact,
        "known": _known,
        "zsre": _zsre,
    }
    if fmt not in converters:
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(converters)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} is missing")
    rows = _read_json(path)
    for item in rows:
        if isinstance(item.row, dict):
            item.row.setdefault("_index", item.index)
    return _convert_all(rows, converters[fmt], path.name, max_bad_fraction)


LOADERS: dict[str, Callable[[Path], LoadResult]] = {
    "counterfact": load_counterfact,
    "known_1000": load_known,
    "zsre": load_zsre,
}


def load_dataset(name: str, root: Path, max_bad_fraction: float = 0.5) -> LoadResult:
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(LOADERS)}")
    return LOADERS[name](Path(root), max_bad_fraction)
