"""Every source shape reads the same rows: JSONL, JSON, CSV, Parquet files, folders, save_to_disk, Hub layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llmtune.data import DataError, ErrorLog, read_records
from llmtune.demo import write_jsonl

ROWS = [
    {"instruction": "Spell 7 as a word.", "input": "", "output": "seven"},
    {"instruction": "Reverse the list.", "input": "a b c", "output": "c b a"},
    {"instruction": "Count the words.", "input": "one two", "output": "2"},
]


def rows_of(source: Path | str, split: str = "train", subset: str | None = None) -> list[dict]:
    return [r.row for r in read_records(str(source), split, ErrorLog("raise"), subset=subset)]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_each_file_type_reads_the_same_rows(tmp_path: Path) -> None:
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    sources = [
        write_jsonl(ROWS, tmp_path / "rows.jsonl"),
        tmp_path / "rows.json",
        write_csv(tmp_path / "rows.csv", ROWS),
        write_parquet(tmp_path / "rows.parquet", ROWS),
    ]
    for source in sources:
        assert rows_of(source) == ROWS, source.suffix


def test_folder_of_files_splits_by_file_name(tmp_path: Path) -> None:
    write_jsonl(ROWS[:2], tmp_path / "folder" / "train.jsonl")
    write_jsonl(ROWS[2:], tmp_path / "folder" / "test.jsonl")
    assert rows_of(tmp_path / "folder", "train") == ROWS[:2]
    assert rows_of(tmp_path / "folder", "test") == ROWS[2:]


def test_save_to_disk_folder_with_splits(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS[:2]), "validation": Dataset.from_list(ROWS[2:])}).save_to_disk(
        str(tmp_path / "saved")
    )
    assert rows_of(tmp_path / "saved", "validation") == ROWS[2:]
    with pytest.raises(DataError, match="no split 'test' \\(it has train, validation\\)"):
        rows_of(tmp_path / "saved", "test")


def test_hub_layout_folder_with_subsets_goes_through_load_dataset(tmp_path: Path) -> None:
    """A repo-shaped folder: subsets and splits resolved by datasets' own rules (README configs), as for a Hub id."""
    repo = tmp_path / "owner__dataset"
    write_parquet(repo / "short" / "train-00000-of-00001.parquet", ROWS[:1])
    write_parquet(repo / "long" / "train-00000-of-00001.parquet", ROWS[1:])
    write_parquet(repo / "long" / "test-00000-of-00001.parquet", ROWS[:1])
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: short\n  data_files:\n  - split: train\n    path: short/train-*\n"
        "- config_name: long\n  data_files:\n  - split: train\n    path: long/train-*\n"
        "  - split: test\n    path: long/test-*\n---\n# A dataset card\n"
    )
    assert rows_of(repo, "train", subset="short") == ROWS[:1]
    assert rows_of(repo, "train", subset="long") == ROWS[1:]
    assert rows_of(repo, "test", subset="long") == ROWS[:1]


def test_bad_line_in_a_folder_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(ROWS, tmp_path / "folder" / "train.jsonl")
    path.write_text(path.read_text() + '{"instruction": "x", "output": \n')
    with pytest.raises(DataError, match=r"train.jsonl, line 4: malformed JSON"):
        rows_of(tmp_path / "folder")
    skipping = ErrorLog("skip")
    assert [r.row for r in read_records(str(tmp_path / "folder"), "train", skipping)] == ROWS
    assert skipping.count == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a",\n', r"rows.jsonl, line 2: malformed JSON"),
        (b'{"instruction": "a", "output": "b"}\n["a list"]\n', r"rows.jsonl, line 2: expected a JSON object"),
        (b'{"instruction": "caf\xe9", "output": "b"}\n', r"rows.jsonl, line 1: not UTF-8 text \(byte 0xe9"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "rows.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=expected):
        rows_of(tmp_path / "rows.jsonl")


def test_csv_with_a_short_row_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("instruction,output\na,b\nonly-one-cell\n")
    with pytest.raises(DataError, match=r"rows.csv, line 3: fewer cells than the header"):
        rows_of(tmp_path / "rows.csv")


def test_missing_source_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist and is not a Hub dataset id"):
        rows_of(tmp_path / "nope.jsonl")
    (tmp_path / "rows.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'"):
        rows_of(tmp_path / "rows.xlsx")


FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.mark.parametrize(
    ("sample_by", "texts"),
    [
        ("line", ["The fox ran over the hill.", "The owl sat in the tree.", "A cat slept."]),
        ("paragraph", ["The fox ran over the hill.\nThe owl sat in the tree.", "A cat slept.\nThe dog barked twice."]),
    ],
)
def test_txt_files_read_as_text_rows_by_line_or_paragraph(sample_by: str, texts: list[str]) -> None:
    records = read_records(str(FIXTURES / "documents.txt"), "train", ErrorLog("raise"), text_sample_by=sample_by)
    assert [r.row["text"] for r in records][: len(texts)] == texts
    assert records[-1].row == {"text": "Rain fell on the lake."} and records[-1].where.endswith("line 8")


def test_a_txt_file_can_be_one_document_and_prepares_as_text(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from llmtune.config import DataConfig
    from llmtune.data import prepare

    [whole] = read_records(str(FIXTURES / "documents.txt"), "train", ErrorLog("raise"), text_sample_by="document")
    assert whole.row["text"] == (FIXTURES / "documents.txt").read_text()
    stats = prepare(
        DataConfig(source=str(FIXTURES / "documents.txt")), AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path
    )
    assert (stats["format"], stats["rows_in"], stats["template"]) == ("text", 5, "none (plain text)")


def test_csv_locations_are_the_line_where_a_multi_line_record_starts() -> None:
    path = FIXTURES / "multiline.csv"
    with pytest.raises(DataError, match=r"multiline.csv, line 3: more cells than the header"):
        rows_of(path)
    skipping = ErrorLog("skip")
    records = read_records(str(path), "train", skipping)
    assert [r.where.rsplit(", ", 1)[1] for r in records] == ["line 2", "line 5", "line 7"]
    assert records[1].row == {"instruction": "Reverse:\nx y", "output": "y x"} and skipping.count == 1


def test_rows_of_a_sharded_folder_are_named_by_their_shard_file() -> None:
    folder = FIXTURES / "shards"
    with pytest.raises(DataError, match=r"shards/data/train-00001-of-00002.jsonl, line 2: malformed JSON"):
        rows_of(folder)
    records = read_records(str(folder), "train", ErrorLog("skip"))
    assert [Path(r.where.split(", ")[0]).name for r in records] == [
        "train-00000-of-00002.jsonl",
        "train-00000-of-00002.jsonl",
        "train-00001-of-00002.jsonl",
    ]
