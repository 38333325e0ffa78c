"""Data: typed fact records, loaders for the paper's data sets, and the known-fact filter."""

from locedit.data.loaders import DatasetError, LoadResult, load_dataset, load_json_file
from locedit.data.records import FactRecord, RecordError, read_records, write_records

__all__ = [
    "DatasetError",
    "FactRecord",
    "LoadResult",
    "RecordError",
    "load_dataset",
    "load_json_file",
    "read_records",
    "write_records",
]
