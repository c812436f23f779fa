"""A sentencepiece BPE tokenizer: training it on a corpus and a small wrapper the rest of megaclone uses.

Special ids are fixed so that every tokenizer megaclone trains agrees on them: unk=0, bos=1, eos=2
(sentencepiece's defaults) and pad=3 (sentencepiece disables pad by default). Normalisation is the
identity, whitespace is kept and unknown characters fall back to bytes, so `decode(encode(text)) == text`
for any text: the model sees exactly what was written.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from megaclone.data.corpus import iter_documents

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# sentencepiece skips (silently) training sentences longer than this many bytes; corpus paragraphs can be long.
MAX_SENTENCE_BYTES = 1 << 16


def _training_lines(documents: Iterator[str], errors: list[Exception]) -> Iterator[str]:
    """sentencepiece trains on sentences, not documents: feed it the non-blank lines of each document.

    An exception raised while reading reaches the caller wrapped in sentencepiece's RuntimeError; keep the
    original in `errors` so it can be re-raised as it was.
    """
    try:
        for document in documents:
            for line in document.splitlines():
                if line.strip():
                    yield line
    except Exception as e:
        errors.append(e)
        raise


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, then rename: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def train_tokenizer(
    output_prefix: str | Path,
    vocab_size: int,
    paths: list[str] | None = None,
    text_key: str = "text",
    max_sentences: int = 1_000_000,
    num_threads: int = 2,
    seed: int = 0,
    verbose: bool = False,
) -> Path:
    """Train a BPE model on the documents of `paths` (None: the default corpus); write `<prefix>.model/.vocab`.

    At most `max_sentences` lines (a seeded random sample when there are more) are used, which keeps training
    to seconds on a couple of cores. Same inputs and seed give a byte-identical model. Each file is written under a
    temporary name and renamed into place, so a crash never leaves a half-written model. Returns the .model path.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be a positive integer")
    if max_sentences < 1:
        raise ValueError(f"max_sentences={max_sentences} must be a positive integer")
    output_prefix = Path(output_prefix)
    documents = iter_documents(paths, text_key)  # validates the inputs before any work
    errors: list[Exception] = []
    lines = _training_lines(documents, errors)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the sentence sample and training are deterministic per seed
    try:
        # model_writer instead of model_prefix: the proto would otherwise record the (temporary) output path,
        # and two trainings on the same data would then differ in their sha256.
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=num_threads,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high (4096). Please set it to a value <= 1234."
        if errors:
            raise errors[0] from None
        raise ValueError(f"training a tokenizer with vocab_size={vocab_size} failed: {e}") from e
    finally:
        lines.close()
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = range(processor.get_piece_size())
    vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in pieces)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = output_prefix.with_name(output_prefix.name + ".model")
    _write_atomic(output_prefix.with_name(output_prefix.name + ".vocab"), vocab.encode("utf-8"))  # human reference
    _write_atomic(model_path, model.getvalue())  # last: the .model is what readers look for
    return model_path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file: shards and checkpoints record it to detect a swapped tokenizer."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """A loaded sentencepiece model. Picklable (it reloads from its path), so data-loader workers can use it."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path, sha256: str) -> None:
        self._processor = processor
        self.path = path
        self.sha256 = sha256  # of the bytes actually loaded, so it cannot disagree with the model in use

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A sentencepiece model, or a Hugging Face `tokenizer.json` (picked by content: JSON starts with `{`).

        By content rather than by name, because a checkpoint stores its tokenizer as `tokenizer.model`
        whatever its kind.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {path} does not exist (train one with tools/train_tokenizer.py)"
            )
        data = path.read_bytes()
        if data.lstrip()[:1] == b"{":
            return HFTokenizer.from_json(data, path)
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer model {path} is not a sentencepiece model: {e}") from e
        return cls(processor, path.resolve(), hashlib.sha256(data).hexdigest())

    def __reduce__(self) -> tuple:
        return (Tokenizer.load, (str(self.path),))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos (the shard writer adds eos between documents)."""
        return self._processor.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """`encode` over many texts at once; sentencepiece spreads the batch over `num_threads` (-1: all cores)."""
        return self._processor.encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self._processor.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def pad_id(self) -> int:
        """-1 when the model has no pad piece (a sentencepiece model trained elsewhere)."""
        return self._processor.pad_id()


# Special tokens of common HF tokenizers, tried when no tokenizer_config.json names them.
_SPECIAL_CANDIDATES = {
    "bos_token": ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"),
    "eos_token": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>"),
    "pad_token": ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"),
}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` model (the tokenizer.json of an imported checkpoint) behind the same interface.

    Special ids come from a `tokenizer_config.json` beside the file when there is one, else from the usual
    token names; -1 when neither names one.
    """

    def __init__(self, tokenizer: object, path: Path, sha256: str, special: dict[str, int]) -> None:
        self._tokenizer = tokenizer
        self.path = path
        self.sha256 = sha256
        self._special = special

    @classmethod
    def from_json(cls, data: bytes, path: Path) -> HFTokenizer:
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError as e:
            raise ImportError(f"tokenizer {path} is a Hugging Face tokenizer.json: install the `tokenizers` "
                              f"package (pip install 'megaclone[hf]')") from e
        try:
            tokenizer = RustTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file; also UnicodeDecodeError
            raise ValueError(f"tokenizer {path} is not a valid Hugging Face tokenizer.json: {e}") from e
        names = dict.fromkeys(_SPECIAL_CANDIDATES)
        config = path.with_name("tokenizer_config.json")
        if config.is_file():
            import json

            try:
                values = json.loads(config.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{config}: not valid JSON ({e})") from e
            for key in names:
                value = values.get(key)
                names[key] = value.get("content") if isinstance(value, dict) else value
        special = {}
        for key, candidates in _SPECIAL_CANDIDATES.items():
            tried = [names[key]] if names[key] else list(candidates)
            ids = [tokenizer.token_to_id(t) for t in tried if isinstance(t, str)]
            special[key] = next((i for i in ids if i is not None), -1)
        return cls(tokenizer, path.resolve(), hashlib.sha256(data).hexdigest(), special)

    def __repr__(self) -> str:
        return f"HFTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the special tokens a post-processor would add."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """`tokenizers` parallelises batches itself (RAYON_NUM_THREADS); `num_threads` is accepted for parity."""
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special["bos_token"]

    @property
    def eos_id(self) -> int:
        return self._special["eos_token"]

    @property
    def pad_id(self) -> int:
        return self._special["pad_token"]
