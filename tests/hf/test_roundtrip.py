"""import -> export gives back the HF checkpoint bit for bit, and the same config, for every family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaclone.hf import export_hf_checkpoint, import_hf_checkpoint
from megaclone.hf.families import ARCHITECTURES
from tests.hf.helpers import CASES, FAMILY_OF, hf_load, hf_logits, read_safetensors, sample_tokens, save_hf_model

# Keys that describe the architecture: export must write back exactly what the source said.
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rms_norm_eps", "layer_norm_eps", "tie_word_embeddings",
             "attention_bias", "mlp_bias", "use_parallel_residual", "hidden_act", "n_embd", "n_layer", "n_head",
             "n_positions", "activation_function", "layer_norm_epsilon", "max_position_embeddings", "bos_token_id",
             "eos_token_id", "ffn_dim", "word_embed_proj_dim", "do_layer_norm_before", "_remove_final_layer_norm",
             "enable_bias", "layer_norm_elementwise_affine", "clip_qkv")


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_export_is_bit_exact(case: str, tmp_path: Path) -> None:
    model = save_hf_model(case, tmp_path / "hf")
    step_dir = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt", tp_size=2, pp_size=2)
    out = export_hf_checkpoint(step_dir, tmp_path / "out")
    original, exported = read_safetensors(tmp_path / "hf"), read_safetensors(out)
    assert sorted(exported) == sorted(original)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    src, dst = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "hf", out))
    assert dst["architectures"] == [ARCHITECTURES[FAMILY_OF[case]]]
    for key in ARCH_KEYS:
        assert dst.get(key) == src.get(key), key
    reloaded = hf_load(out)  # transformers reads the written config (rope settings included) as the source's
    if getattr(model.config, "rope_parameters", None):
        assert reloaded.config.rope_parameters == model.config.rope_parameters
    assert torch.equal(hf_logits(reloaded, sample_tokens()), hf_logits(model, sample_tokens()))
    # the tokenizer and its config come back byte for byte / value for value
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "tokenizer_config.json").read_text())


def test_sharded_export_and_reimport(tmp_path: Path) -> None:
    """A size limit splits the export into shards with an index; importing those gives the same checkpoint."""
    save_hf_model("gpt_neox", tmp_path / "hf")
    first = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    out = export_hf_checkpoint(first, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in read_safetensors(out).values())
    second = import_hf_checkpoint(out, tmp_path / "ckpt2", tp_size=2)
    again = export_hf_checkpoint(second, tmp_path / "again")
    assert sorted(read_safetensors(again)) == sorted(read_safetensors(tmp_path / "hf"))
    for name, t in read_safetensors(tmp_path / "hf").items():
        assert torch.equal(read_safetensors(again)[name], t), name


def test_bf16_round_trip(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "hf", dtype=torch.bfloat16)
    step_dir = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    out = export_hf_checkpoint(step_dir, tmp_path / "out", dtype="bfloat16")
    original, exported = read_safetensors(tmp_path / "hf"), read_safetensors(out)
    assert sorted(exported) == sorted(original)
    for name, t in original.items():
        assert t.dtype == torch.bfloat16 and torch.equal(exported[name], t), name


@pytest.mark.parametrize("case,prefix", [("gpt2", "transformer."), ("opt_350m", "model.")])
def test_checkpoints_without_the_model_prefix(case: str, prefix: str, tmp_path: Path) -> None:
    """The original GPT-2 and OPT checkpoints name tensors without `transformer.` / `model.` (GPT-2's also keep the
    attention mask buffers); export writes the prefix back."""
    model = save_hf_model(case, tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = {k.removeprefix(prefix): v for k, v in load_file(str(path)).items()}
    assert not any(k.startswith(prefix) for k in tensors)
    if case == "gpt2":
        for i in range(2):
            tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(tensors, str(path), metadata={"format": "pt"})
    step_dir = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    out = export_hf_checkpoint(step_dir, tmp_path / "out")
    written = read_safetensors(out)
    assert all(k.startswith(prefix) for k in written if k != "lm_head.weight")
    assert (hf_logits(hf_load(out), sample_tokens()) - hf_logits(model, sample_tokens())).abs().max() == 0
