"""Packed token shards: every document's token ids followed by eos, concatenated into one flat file per split.

Layout for `output_prefix` P and split S in (train, valid):
  `P_S.bin`       raw little-endian token ids (uint16 when the vocabulary has < 65536 entries, else uint32),
                  memory-mappable with no header, so a sample is a slice and nothing is loaded up front;
  `P_S.idx.json`  dtype, num_tokens, document offsets, the tokenizer's path, sha256 and vocab_size.
The index is renamed into place after its .bin, so an index on disk always describes a complete shard.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megaclone.data.corpus import iter_documents
from megaclone.data.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger("megaclone.data")  # a run's console shows these lines (megaclone.train.logging)
PROGRESS_LOG_S = 10.0  # a progress line this often while tokenizing

SHARD_FORMAT = "megaclone-token-shard"
SHARD_VERSION = 1
SPLITS = ("train", "valid")
_WRITE_CHUNK_TOKENS = 1 << 20  # tokens buffered in memory before they are appended to a file
_ENCODE_BATCH_DOCS = 64  # documents per sentencepiece call (it encodes a batch on several threads)


def shard_paths(prefix: str | Path, split: str) -> tuple[Path, Path]:
    """(`<prefix>_<split>.bin`, `<prefix>_<split>.idx.json`)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    return Path(f"{prefix}_{split}.bin"), Path(f"{prefix}_{split}.idx.json")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: halves the disk and page-cache footprint for small vocabs."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True for validation documents: a seeded permutation's first round(n * fraction) documents.

    With at least 2 documents and a positive fraction both splits get at least one document, so a small corpus
    still has something to evaluate on. The same (n, fraction, seed) always gives the same split.
    """
    is_valid = np.zeros(num_documents, dtype=bool)
    if num_documents < 2 or valid_fraction <= 0:
        return is_valid
    num_valid = min(max(1, round(num_documents * valid_fraction)), num_documents - 1)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(num_documents)
    is_valid[order[:num_valid]] = True
    return is_valid


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _tokenize_to_file(documents: Iterable[str], tokenizer: Tokenizer, path: Path, dtype: np.dtype) -> np.ndarray:
    """Pass 1: append every document's ids plus eos to `path` in chunks; return the document offsets [n + 1]."""
    offsets = [0]
    pending: list[np.ndarray] = []
    pending_tokens = 0
    eos = [tokenizer.eos_id]
    total = len(documents) if hasattr(documents, "__len__") else None
    said = time.monotonic()
    with open(path, "wb") as f, tqdm(total=total, unit="doc", desc="tokenizing", disable=None) as progress:
        for batch in _batches(documents, _ENCODE_BATCH_DOCS):
            if time.monotonic() - said >= PROGRESS_LOG_S:  # the bar shows only on a terminal; a log file gets lines
                log.info(f"data: tokenized {len(offsets) - 1} documents, {offsets[-1]:,} tokens")
                said = time.monotonic()
            for ids in tokenizer.encode_batch(batch):
                tokens = np.asarray(ids + eos, dtype=dtype)
                pending.append(tokens)
                pending_tokens += tokens.size
                offsets.append(offsets[-1] + tokens.size)
            if pending_tokens >= _WRITE_CHUNK_TOKENS:
                np.concatenate(pending).tofile(f)
                pending, pending_tokens = [], 0
            progress.update(len(batch))
        if pending:
            np.concatenate(pending).tofile(f)
    return np.asarray(offsets, dtype=np.int64)


def _copy_split(source: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray, path: Path) -> np.ndarray:
    """Pass 2: copy the documents `doc_ids` (ascending) from `source` to `path`; return their new offsets."""
    lengths = offsets[doc_ids + 1] - offsets[doc_ids]
    with open(path, "wb") as f:
        # Consecutive document ids are contiguous in `source`: copy each run in bounded chunks.
        run_starts = np.flatnonzero(np.diff(doc_ids, prepend=-2) != 1)
        run_ends = np.append(run_starts[1:], doc_ids.size)
        for first, last in zip(run_starts, run_ends):
            begin, end = int(offsets[doc_ids[first]]), int(offsets[doc_ids[last - 1] + 1])
            for start in range(begin, end, _WRITE_CHUNK_TOKENS):
                source[start:min(end, start + _WRITE_CHUNK_TOKENS)].tofile(f)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def write_token_shards(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    output_prefix: str | Path,
    valid_fraction: float = 0.05,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Tokenize `documents` (eos after each) into train/valid shards at `output_prefix`; return both indexes.

    Documents stream through: token ids go to a temporary file in chunks (pass 1), and once the number of
    documents is known the seeded split copies them into the two shards (pass 2), so memory holds only offsets.
    Everything is written under temporary names and renamed into place when complete.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction={valid_fraction} must be in [0, 1)")
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tag = f".tmp-{os.getpid()}"
    all_tokens_path = Path(f"{prefix}_all.bin{tag}")
    temporaries = [all_tokens_path]
    try:
        offsets = _tokenize_to_file(documents, tokenizer, all_tokens_path, dtype)
        num_documents = offsets.size - 1
        if num_documents == 0:
            raise ValueError(f"no documents to write to {prefix}_*.bin (all inputs were empty)")
        source = np.memmap(all_tokens_path, dtype=dtype, mode="r", shape=(int(offsets[-1]),))
        is_valid = split_documents(num_documents, valid_fraction, seed)
        indexes, renames = {}, []
        for split, mask in (("train", ~is_valid), ("valid", is_valid)):
            bin_path, idx_path = shard_paths(prefix, split)
            tmp_bin, tmp_idx = Path(f"{bin_path}{tag}"), Path(f"{idx_path}{tag}")
            temporaries += [tmp_bin, tmp_idx]
            doc_ids = np.flatnonzero(mask)
            split_offsets = _copy_split(source, offsets, doc_ids, tmp_bin)
            indexes[split] = {
                "format": SHARD_FORMAT,
                "version": SHARD_VERSION,
                "split": split,
                "bin": bin_path.name,
                "dtype": dtype.name,
                "num_tokens": int(split_offsets[-1]),
                "num_documents": int(doc_ids.size),
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "tokenizer_path": str(tokenizer.path),
                "tokenizer_sha256": tokenizer.sha256,
                "valid_fraction": valid_fraction,
                "seed": seed,
                "doc_offsets": split_offsets.tolist(),
                "doc_ids": doc_ids.tolist(),  # position of each document in the input order
            }
            tmp_idx.write_text(json.dumps(indexes[split]))
            renames += [(tmp_bin, bin_path), (tmp_idx, idx_path)]
        del source
        for tmp, final in renames:  # each .bin before its index
            os.replace(tmp, final)
    finally:
        for path in temporaries:
            path.unlink(missing_ok=True)
    return indexes


class TokenShard:
    """One split's tokens, memory-mapped read-only: opening is instant and costs no memory whatever the size."""

    def __init__(self, bin_path: Path, index: dict[str, Any], tokens: np.ndarray) -> None:
        self.bin_path = bin_path
        self.index = index
        self._tokens = tokens

    @classmethod
    def open(cls, prefix: str | Path, split: str) -> TokenShard:
        """Open `<prefix>_<split>.bin` through its index, refusing missing, foreign or truncated files."""
        bin_path, idx_path = shard_paths(prefix, split)
        hint = f"write the shards with `python tools/preprocess_data.py --output-prefix {prefix}`"
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise FileNotFoundError(f"token shard file {path} does not exist; {hint}")
        try:
            index = json.loads(idx_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"token shard index {idx_path} is not valid JSON ({e}); {hint}") from e
        if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT:
            raise ValueError(f"{idx_path} is not a megaclone token shard index; {hint}")
        if index.get("version") != SHARD_VERSION:
            raise ValueError(f"{idx_path}: shard format version {index.get('version')} is not {SHARD_VERSION}; {hint}")
        if index.get("dtype") not in ("uint16", "uint32"):
            raise ValueError(f"{idx_path}: dtype {index.get('dtype')!r} is not uint16 or uint32")
        dtype = np.dtype(index["dtype"])
        num_tokens = int(index["num_tokens"])
        offsets = index["doc_offsets"]
        if len(offsets) != index["num_documents"] + 1 or offsets[0] != 0 or offsets[-1] != num_tokens:
            raise ValueError(f"{idx_path}: document offsets do not match num_documents / num_tokens; {hint}")
        expected, actual = num_tokens * dtype.itemsize, bin_path.stat().st_size
        if actual != expected:
            raise ValueError(
                f"token shard {bin_path} has {actual} bytes but its index {idx_path} describes {num_tokens} tokens x "
                f"{dtype.itemsize} bytes = {expected}: the shard is truncated or belongs to another index; {hint}"
            )
        # np.memmap cannot map an empty file; an empty split is still a valid (if useless) shard.
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,)) if num_tokens else np.zeros(0, dtype)
        return cls(bin_path, index, tokens)

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenShard({str(self.bin_path)!r}, num_tokens={self.num_tokens}, vocab_size={self.vocab_size})"

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.index["num_documents"])

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.index["tokenizer_sha256"])

    def get(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as a read-only view of the file (copy it before modifying)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) out of range for {self.bin_path} ({self.num_tokens})")
        return self._tokens[start:start + length]

    def document(self, i: int) -> np.ndarray:
        """The tokens of the i-th document of this split, its trailing eos included."""
        offsets = self.index["doc_offsets"]
        return self.get(offsets[i], offsets[i + 1] - offsets[i])


def prepare_data(
    output_prefix: str | Path,
    paths: list[str] | None = None,
    tokenizer_path: str | Path | None = None,
    vocab_size: int = 2048,
    text_key: str = "text",
    valid_fraction: float = 0.05,
    seed: int = 0,
    reuse: bool = False,
) -> dict[str, dict[str, Any]]:
    """Tokenizer plus shards in one call: what tools/preprocess_data.py and a run without `data.data_prefix` need.

    Without `tokenizer_path` a tokenizer is trained on the same inputs at `<output_prefix>_tokenizer.model`.
    `reuse=True` keeps an existing trained tokenizer and existing shards when both splits open cleanly and were
    written with that tokenizer (it does not check that the inputs are unchanged).
    """
    if not 0.0 <= valid_fraction < 1.0:  # checked here too: before a tokenizer is trained for nothing
        raise ValueError(f"valid_fraction={valid_fraction} must be in [0, 1)")
    if tokenizer_path is None:
        tokenizer_path = Path(f"{output_prefix}_tokenizer.model")
        if not (reuse and tokenizer_path.is_file()):
            log.info(f"data: training a {vocab_size}-piece tokenizer at {tokenizer_path}")
            tokenizer_path = train_tokenizer(f"{output_prefix}_tokenizer", vocab_size, paths, text_key, seed=seed)
    tokenizer = Tokenizer.load(tokenizer_path)
    if reuse:
        try:
            shards = [TokenShard.open(output_prefix, split) for split in SPLITS]
        except (FileNotFoundError, ValueError):
            shards = []
        if shards and all(s.tokenizer_sha256 == tokenizer.sha256 for s in shards):
            log.info(f"data: reusing the token shards {output_prefix}_{{train,valid}}.bin")
            return {s.index["split"]: s.index for s in shards}
    log.info(f"data: tokenizing into {output_prefix}_{{train,valid}}.bin")
    return write_token_shards(iter_documents(paths, text_key), tokenizer, output_prefix, valid_fraction, seed)
