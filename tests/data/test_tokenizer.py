"""Tokenizer training and the wrapper: exact round trip, fixed special ids, atomic and deterministic output."""

import pickle
import random

import pytest

from megaclone.data import Tokenizer, file_sha256, train_tokenizer

SYLLABLES = ["ka", "to", "ri", "mu", "sen", "do", "la", "vi", "nor", "pe", "qua", "ti", "bo", "ge", "shi", "an"]


def synthetic_documents(num_documents: int, seed: int = 0) -> list[str]:
    """Pseudo-words from syllables: enough distinct words for a 512-piece BPE, without depending on a corpus."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(400)] + ["café", "Straße", "naïve"]
    docs = []
    for _ in range(num_documents):
        lines = [" ".join(rng.choices(words, k=rng.randint(5, 20))) + rng.choice([".", ",", "!", " 1984."])
                 for _ in range(rng.randint(3, 10))]
        docs.append("\n".join(lines) + "\n")
    return docs


def write_text_files(directory, docs: list[str]) -> list[str]:
    paths = []
    for i, doc in enumerate(docs):
        path = directory / f"doc{i:03d}.txt"
        path.write_text(doc, encoding="utf-8")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def corpus_paths(tmp_path_factory):
    return write_text_files(tmp_path_factory.mktemp("corpus"), synthetic_documents(30))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus_paths):
    out = tmp_path_factory.mktemp("tok")
    return Tokenizer.load(train_tokenizer(out / "tok", 512, corpus_paths))


def test_special_ids_and_vocab(tokenizer):
    assert tokenizer.vocab_size == 512
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    assert tokenizer.decode([0]) == " ⁇ "  # unk


@pytest.mark.parametrize("text", [
    "", "kato rimu sen.", "  leading and  double  spaces ", "lines\n\nwith\ttabs\r\n", "café Straße naïve",
    "never seen: 中文 🙂 Ω ¿?", "digits 1234567890 and 3.14159",
])
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, text]) == [ids, ids]


def test_training_is_atomic_and_deterministic(tmp_path, corpus_paths, tokenizer):
    model = train_tokenizer(tmp_path / "again", 512, corpus_paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model", "again.vocab"]  # no temporaries left
    assert model == tmp_path / "again.model"
    assert file_sha256(model) == tokenizer.sha256


def test_vocab_too_large_is_a_value_error(tmp_path, corpus_paths):
    with pytest.raises(ValueError, match="vocab_size=100000"):
        train_tokenizer(tmp_path / "big", 100_000, corpus_paths[:2])
    assert list(tmp_path.iterdir()) == []


def test_missing_input_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer(tmp_path / "tok", 512, [str(tmp_path / "nope.txt")])
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.model"):
        Tokenizer.load(tmp_path / "absent.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer.load(garbage)


def test_pickle_reloads_from_path(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.path == tokenizer.path and clone.sha256 == tokenizer.sha256
    assert clone.encode("kato rimu") == tokenizer.encode("kato rimu")


def test_bad_row_error_is_not_hidden_by_sentencepiece(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 7}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl: row 1: 'text' is int"):
        train_tokenizer(tmp_path / "tok", 300, [str(path)])
