"""Loaders for both CounterFact formats, known facts, zsRE, and broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from locedit.data.loaders import (
    DatasetError,
    load_counterfact,
    load_dataset,
    load_json_file,
    load_known,
    load_zsre,
)
from locedit.data.records import FactRecord, read_records, write_records

ROME_RECORD = {
    "case_id": 7,
    "pararel_idx": 1,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks", "Danielle Darrieux's tongue is"],
    "neighborhood_prompts": [f"Neighbour {i} speaks" for i in range(10)],
}

EASYEDIT_RECORD = {
    "case_id": 3,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}


def _write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def test_rome_format_keeps_every_paraphrase_and_neighbour(tmp_path):
    _write(tmp_path / "counterfact.json", [ROME_RECORD])
    result = load_counterfact(tmp_path)
    (record,) = result.records
    assert record.fact_id == "cf-7"
    assert record.prompt == "The mother tongue of Danielle Darrieux is"
    assert record.template == "The mother tongue of {} is"
    assert (record.target_true, record.target_new, record.relation_id) == ("French", "English", "P103")
    assert len(record.paraphrase_prompts) == 2 and len(record.neighborhood_prompts) == 10


def test_easyedit_split_files_are_merged_in_case_id_order(tmp_path):
    folder = tmp_path / "counterfact_easyedit"
    _write(folder / "counterfact-train.json", [dict(EASYEDIT_RECORD, case_id=5)])
    _write(folder / "counterfact-edit.json", [dict(EASYEDIT_RECORD, case_id=9), EASYEDIT_RECORD])
    result = load_counterfact(tmp_path)
    assert [r.fact_id for r in result.records] == ["cf-3", "cf-5", "cf-9"]
    assert result.records[0].paraphrase_prompts == ("Where Danielle Darrieux is from, people speak",)
    assert result.records[0].neighborhood_prompts == ("Michel Rocard is a native speaker of",)


def test_broken_records_are_skipped_with_counted_reasons(tmp_path):
    bad = [
        {k: v for k, v in EASYEDIT_RECORD.items() if k != "ground_truth"},
        dict(EASYEDIT_RECORD, subject="Nobody"),
        dict(EASYEDIT_RECORD, target_new=" "),
        "not a record",
    ]
    good = [dict(EASYEDIT_RECORD, case_id=i) for i in range(10, 16)]
    _write(tmp_path / "counterfact_easyedit" / "counterfact-edit.json", bad + good)
    result = load_counterfact(tmp_path)
    assert len(result.records) == 6
    assert result.n_skipped == 4
    assert result.skipped["subject not in prompt"] == 1
    assert result.skipped["empty target_new"] == 1
    assert result.skipped["not a JSON object (a str)"] == 1
    assert sum(v for k, v in result.skipped.items() if k.startswith("malformed")) == 1
    # every skipped record is named by file and index
    file = tmp_path / "counterfact_easyedit" / "counterfact-edit.json"
    assert len(result.problems) == 4 and all(p.startswith(f"{file}[") for p in result.problems)
    assert any(p.startswith(f"{file}[3]: not a JSON object") for p in result.problems)


def test_case_ids_of_any_type_are_accepted_or_refused_per_record(tmp_path):
    ids = [3, "1", "abc", 2.0, None, True, [4], 1.5]
    rows = [dict(EASYEDIT_RECORD, case_id=value) for value in ids]
    rows.append({k: v for k, v in EASYEDIT_RECORD.items() if k != "case_id"})
    _write(tmp_path / "counterfact_easyedit" / "counterfact-edit.json", rows)
    result = load_counterfact(tmp_path, max_bad_fraction=1.0)
    assert [r.fact_id for r in result.records] == ["cf-1", "cf-2", "cf-3", "cf-abc"]
    assert result.n_skipped == 5 and result.skipped["missing case_id"] == 1
    reasons = sorted(p.split(": ", 1)[1] for p in result.problems)
    assert reasons == sorted([
        "case_id must be an integer or a string, not None",
        "case_id must be an integer or a string, not True",
        "case_id must be an integer or a string, not list [4]",
        "case_id must be an integer or a string, not float 1.5",
        "missing case_id",
    ])


@pytest.mark.parametrize("text", ['[{"case_id": 1}] x', '[{"case_id": 1},', "\xff"])
def test_a_file_that_is_not_json_is_named(tmp_path, text):
    path = tmp_path / "counterfact_easyedit" / "counterfact-edit.json"
    path.parent.mkdir()
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DatasetError) as err:
        load_counterfact(tmp_path)
    assert str(err.value).startswith(f"{path}: not ") and "\n" not in str(err.value)


def test_mostly_bad_data_is_an_error(tmp_path):
    rows = [{"case_id": i} for i in range(9)] + [EASYEDIT_RECORD]
    _write(tmp_path / "counterfact_easyedit" / "counterfact-edit.json", rows)
    with pytest.raises(DatasetError, match="9 of 10 records are unusable"):
        load_counterfact(tmp_path)


def test_missing_file_names_source_and_import_command(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_known(tmp_path)
    message = str(err.value)
    assert "known_1000.json" in message and "curl -fL" in message and "rome.baulab.info" in message


def test_zsre_record_maps_question_answers_and_locality(tmp_path):
    row = {
        "subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "pred": "x", "rephrase": "What university did Watts Humphrey go to?",
        "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father", "loc_ans": "Hugo Weaving", "cond": "",
    }
    path = _write(tmp_path / "z.json", [row])
    (record,) = load_json_file(path, "zsre").records
    assert record.prompt == row["src"] and record.target_new == "University of Michigan"
    assert record.target_true == "Illinois Institute of Technology"
    assert record.neighborhood_prompts == ("who played desmond doss father?",)


def test_records_round_trip_through_jsonl(tmp_path):
    record = FactRecord("cf-1", "Paris", "Paris is in", "France", "Italy", ("p",), ("n",), "P17", "x", {"p_true": 0.5})
    write_records(tmp_path / "f.jsonl", [record])
    (back,) = read_records(tmp_path / "f.jsonl")
    assert back == record and back.extra == {"p_true": 0.5}


def test_shared_data_sets_load(shared_data):
    assert len(load_known(shared_data).records) == 1209
    counterfact = load_counterfact(shared_data)
    assert len(counterfact.records) == 21919 and counterfact.records[0].fact_id == "cf-0"
    assert len(load_zsre(shared_data).records) > 1000
    assert load_dataset("known_1000", shared_data).records[0].target_true == "Antarctica"
