"""Packed token shards: contents equal direct encoding, deterministic split, atomic writes, corruption detected."""

import json
import random

import numpy as np
import pytest

from megaclone.data import Tokenizer, TokenShard, prepare_data, shard_paths, train_tokenizer, write_token_shards
from megaclone.data import shards as shards_module
from megaclone.data.shards import split_documents, token_dtype

SYLLABLES = ["ka", "to", "ri", "mu", "sen", "do", "la", "vi", "nor", "pe", "qua", "ti", "bo", "ge", "shi", "an"]


def synthetic_documents(num_documents: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(400)] + ["café", "Straße"]
    return ["\n".join(" ".join(rng.choices(words, k=rng.randint(5, 20))) + "." for _ in range(rng.randint(1, 8)))
            for _ in range(num_documents)]


@pytest.fixture(scope="module")
def documents():
    return synthetic_documents(40)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, documents):
    corpus = tmp_path_factory.mktemp("corpus")
    paths = []
    for i, doc in enumerate(documents):
        (corpus / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
        paths.append(str(corpus / f"{i:03d}.txt"))
    return Tokenizer.load(train_tokenizer(tmp_path_factory.mktemp("tok") / "tok", 512, paths))


def test_shards_equal_direct_encoding(tmp_path, documents, tokenizer):
    indexes = write_token_shards(documents, tokenizer, tmp_path / "data", valid_fraction=0.2, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data_train.bin", "data_train.idx.json", "data_valid.bin", "data_valid.idx.json"]  # no temporaries
    seen = []
    for split in ("train", "valid"):
        shard = TokenShard.open(tmp_path / "data", split)
        index = json.loads(shard_paths(tmp_path / "data", split)[1].read_text())
        assert index == indexes[split] == shard.index
        assert index["dtype"] == "uint16" and index["vocab_size"] == 512 == shard.vocab_size
        assert index["tokenizer_sha256"] == tokenizer.sha256 and index["tokenizer_path"] == str(tokenizer.path)
        expected = [tokenizer.encode(documents[i]) + [tokenizer.eos_id] for i in index["doc_ids"]]
        assert len(shard) == shard.num_tokens == sum(map(len, expected))
        assert shard.get(0, len(shard)).tolist() == [t for doc in expected for t in doc]
        for k, doc in enumerate(expected):
            assert shard.document(k).tolist() == doc
        seen += index["doc_ids"]
    assert sorted(seen) == list(range(len(documents)))
    assert len(indexes["valid"]["doc_ids"]) == round(0.2 * len(documents))


def test_chunked_writing_gives_identical_files(tmp_path, documents, tokenizer, monkeypatch):
    write_token_shards(documents, tokenizer, tmp_path / "big")
    monkeypatch.setattr(shards_module, "_WRITE_CHUNK_TOKENS", 7)
    monkeypatch.setattr(shards_module, "_ENCODE_BATCH_DOCS", 3)
    write_token_shards(iter(documents), tokenizer, tmp_path / "small")  # a generator: length unknown
    for split in ("train", "valid"):
        big, small = shard_paths(tmp_path / "big", split)[0], shard_paths(tmp_path / "small", split)[0]
        assert big.read_bytes() == small.read_bytes()


def test_split_is_deterministic_and_never_empty():
    assert split_documents(2, 0.05, seed=0).sum() == 1
    assert split_documents(1, 0.5, seed=0).sum() == 0  # a single document goes to train
    assert split_documents(10, 0.0, seed=0).sum() == 0
    assert split_documents(10, 0.99, seed=0).sum() == 9  # train keeps at least one document
    a, b = split_documents(1000, 0.1, seed=1), split_documents(1000, 0.1, seed=2)
    assert a.sum() == b.sum() == 100
    assert (a == split_documents(1000, 0.1, seed=1)).all() and (a != b).any()


def test_empty_valid_split_opens(tmp_path, documents, tokenizer):
    write_token_shards(documents[:3], tokenizer, tmp_path / "d", valid_fraction=0.0)
    valid = TokenShard.open(tmp_path / "d", "valid")
    assert len(valid) == 0 and valid.num_documents == 0


def test_failed_write_leaves_nothing(tmp_path, documents, tokenizer):
    def broken():
        yield from documents[:5]
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError, match="reader died"):
        write_token_shards(broken(), tokenizer, tmp_path / "d")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no documents"):
        write_token_shards([], tokenizer, tmp_path / "d")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="valid_fraction"):
        write_token_shards(documents, tokenizer, tmp_path / "d", valid_fraction=1.0)


def test_missing_and_truncated_shards_are_detected(tmp_path, documents, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"nothing_train\.idx\.json.*tools/preprocess_data\.py"):
        TokenShard.open(tmp_path / "nothing", "train")
    write_token_shards(documents, tokenizer, tmp_path / "d")
    bin_path, idx_path = shard_paths(tmp_path / "d", "train")
    with bin_path.open("r+b") as f:
        f.truncate(bin_path.stat().st_size - 2)
    with pytest.raises(ValueError, match=r"d_train\.bin.*truncated"):
        TokenShard.open(tmp_path / "d", "train")
    bin_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"d_train\.bin.*tools/preprocess_data\.py"):
        TokenShard.open(tmp_path / "d", "train")
    with pytest.raises(ValueError, match="split"):
        TokenShard.open(tmp_path / "d", "test")
    shard = TokenShard.open(tmp_path / "d", "valid")
    with pytest.raises(IndexError):
        shard.get(len(shard) - 1, 2)


def test_dtype_follows_vocab_size():
    assert token_dtype(512) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(128_000) == np.uint32


def test_prepare_data_trains_tokenizer_and_reuses(tmp_path, documents):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    indexes = prepare_data(tmp_path / "out" / "d", paths=[str(corpus)], vocab_size=400, valid_fraction=0.1)
    model = tmp_path / "out" / "d_tokenizer.model"
    assert indexes["train"]["tokenizer_path"] == str(model.resolve()) and indexes["train"]["vocab_size"] == 400
    stamp = shard_paths(tmp_path / "out" / "d", "train")[0].stat().st_mtime_ns, model.stat().st_mtime_ns
    again = prepare_data(tmp_path / "out" / "d", paths=[str(corpus)], vocab_size=400, valid_fraction=0.1, reuse=True)
    assert again == indexes
    assert (shard_paths(tmp_path / "out" / "d", "train")[0].stat().st_mtime_ns, model.stat().st_mtime_ns) == stamp


def test_tokenizing_says_how_far_it_got(tmp_path, documents, tokenizer, monkeypatch, caplog):
    """Without a terminal there is no progress bar: a line every PROGRESS_LOG_S seconds instead."""
    import logging

    monkeypatch.setattr(shards_module, "PROGRESS_LOG_S", 0.0)
    monkeypatch.setattr(shards_module, "_ENCODE_BATCH_DOCS", 16)
    with caplog.at_level(logging.INFO, logger="megaclone.data"):
        write_token_shards(documents, tokenizer, tmp_path / "d")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: tokenized")]
    assert said[0] == "data: tokenized 0 documents, 0 tokens"
    assert said[1].startswith("data: tokenized 16 documents, ") and len(said) == 3  # 40 documents, 16 a batch
