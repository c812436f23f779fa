"""Tokenizers travel with the weights: sentencepiece tokenizer.model or HF tokenizer.json, both loadable."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import read_manifest
from megaclone.data import Tokenizer, train_tokenizer
from megaclone.data.tokenizer import HFTokenizer
from megaclone.hf import export_hf_checkpoint, import_hf_checkpoint
from tests.hf.helpers import hf_load, hf_logits, randomize, write_tokenizer_json


def test_hf_tokenizer_json_loads_by_content(tmp_path: Path) -> None:
    path = write_tokenizer_json(tmp_path)
    tok = Tokenizer.load(path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 100
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)  # from tokenizer_config.json
    assert tok.encode("w5 w17 w99") == [5, 17, 99]
    assert tok.decode([5, 17]) == "w5 w17"
    assert tok.encode_batch(["w3", "w4 w4"]) == [[3], [4, 4]]
    renamed = tmp_path / "sub" / "tokenizer.model"  # a checkpoint stores it under this name
    renamed.parent.mkdir()
    renamed.write_bytes(path.read_bytes())
    again = pickle.loads(pickle.dumps(Tokenizer.load(renamed)))
    assert isinstance(again, HFTokenizer) and again.sha256 == tok.sha256
    assert again.eos_id == 1  # no tokenizer_config.json beside it: found by the usual name </s>


def test_bad_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_sentencepiece_tokenizer_round_trip(tmp_path: Path) -> None:
    """A Llama with a sentencepiece tokenizer.model: copied into the checkpoint, exported back byte for byte."""
    import transformers

    rng = random.Random(0)
    words = ["".join(rng.choices("aeioukstrnl", k=rng.randint(2, 6))) for _ in range(300)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(400)))
    spm = train_tokenizer(tmp_path / "spm", 384, [str(corpus)])
    hf_dir = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=32)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    randomize(model, seed=1)
    model.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.model").write_bytes(spm.read_bytes())
    write_tokenizer_json(hf_dir)  # both present: the sentencepiece model wins
    step_dir = import_hf_checkpoint(hf_dir, tmp_path / "ckpt")
    manifest = read_manifest(step_dir)
    assert manifest.provenance["hf_import"]["tokenizer"] == "tokenizer.model"
    assert Tokenizer.load(step_dir / manifest.tokenizer).vocab_size == 384
    out = export_hf_checkpoint(step_dir, tmp_path / "out")
    assert (out / "tokenizer.model").read_bytes() == spm.read_bytes()
    assert not (out / "tokenizer.json").exists()
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    tokens = torch.tensor([Tokenizer.load(out / "tokenizer.model").encode(" ".join(words[:10]))])
    assert torch.equal(hf_logits(hf_load(out), tokens), hf_logits(model, tokens))
