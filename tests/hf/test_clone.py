"""import -> HyperClone x2 -> export: transformers runs the widened model and gets the original's logits."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import read_manifest
from megaclone.clone import clone_checkpoint, widen_model_config
from megaclone.config import CloneConfig
from megaclone.hf import export_hf_checkpoint, import_hf_checkpoint
from megaclone.hf.families import config_from_hf
from tests.hf.helpers import (
    CASES,
    FAMILY_OF,
    VOCAB,
    hf_load,
    hf_logits,
    read_safetensors,
    sample_tokens,
    save_hf_model,
)

TOLERANCE = 1e-5  # of max |logit| (docs/design.md, "Shard locality and layout invariance")


def relative_error(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def clone_and_export(case: str, tmp_path: Path, clone: CloneConfig, family: str | None = None):
    model = save_hf_model(case, tmp_path / "hf")
    small = import_hf_checkpoint(tmp_path / "hf", tmp_path / "small", tp_size=2)
    wide = clone_checkpoint(small, tmp_path / "wide", dataclasses.replace(clone, init_from=str(small)), 2, 2)
    out = export_hf_checkpoint(wide, tmp_path / "out", family)
    return model, out


@pytest.mark.filterwarnings("ignore:the clone unties")
@pytest.mark.parametrize("case", sorted(CASES))
def test_clone_of_import_preserves_transformers_logits(case: str, tmp_path: Path) -> None:
    model, out = clone_and_export(case, tmp_path, CloneConfig(factor=2))
    wide = hf_load(out)
    assert wide.config.model_type == FAMILY_OF[case]  # mistral stays mistral: found through the clone's source
    assert wide.config.hidden_size == 2 * model.config.hidden_size
    assert wide.config.num_attention_heads == 2 * model.config.num_attention_heads
    tokens = sample_tokens(seed=3)
    assert relative_error(hf_logits(wide, tokens), hf_logits(model, tokens)) <= TOLERANCE


# One case per family added for the paper's models, through every variant / noise pair besides the plain clone
# above; OPT-350m also at x3.
VARIANT_RUNS = [(case, n, variant, noise) for case in ("opt_350m", "olmo_tied", "olmo2", "gemma")
                for n, variant, noise in ((2, "diagonal", None), (2, "symmetric", 0.0), (2, "diagonal", 0.0))]
VARIANT_RUNS.append(("opt_350m", 3, "diagonal", 0.0))


@pytest.mark.filterwarnings("ignore:the clone unties")
@pytest.mark.parametrize("case,n,variant,noise", VARIANT_RUNS)
def test_every_variant_of_the_family_clones_preserves_logits(case: str, n: int, variant: str, noise: float | None,
                                                            tmp_path: Path) -> None:
    model, out = clone_and_export(case, tmp_path, CloneConfig(factor=n, variant=variant, noise_db=noise, seed=5))
    wide = hf_load(out)
    assert wide.config.hidden_size == n * model.config.hidden_size
    tokens = sample_tokens(seed=6)
    assert relative_error(hf_logits(wide, tokens), hf_logits(model, tokens)) <= TOLERANCE


@pytest.mark.parametrize("case,embed", [("opt", 64), ("opt_350m", 32)])
def test_opt_word_embed_proj_dim_is_widened(case: str, embed: int, tmp_path: Path) -> None:
    """The reference implementation keeps word_embed_proj_dim: a widened opt-125m then needs projections it does
    not have, and a widened opt-350m reads a wrong projection. Here it is widened with the hidden size."""
    _, out = clone_and_export(case, tmp_path, CloneConfig(factor=2))
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["word_embed_proj_dim"]) == (64, embed)
    tensors = read_safetensors(out)
    assert ("model.decoder.project_in.weight" in tensors) == (embed != 64)
    assert tensors["model.decoder.embed_tokens.weight"].shape == (VOCAB, embed)


@pytest.mark.parametrize("case,embed,norm", [
    ("gpt_neox_sequential_tied", "gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight"),
    ("opt", "model.decoder.embed_tokens.weight", "model.decoder.final_layer_norm.weight")])
def test_tied_input_embedding_is_copied_not_halved(case: str, embed: str, norm: str, tmp_path: Path) -> None:
    """The reference implementation halves the tied GPT-NeoX input embedding; the 1/n belongs to the final norm."""
    _, out = clone_and_export(case, tmp_path, CloneConfig(factor=2))
    source, wide = read_safetensors(tmp_path / "hf"), read_safetensors(out)
    assert torch.equal(wide[embed], source[embed].repeat_interleave(2, dim=1))
    assert torch.equal(wide[norm], source[norm].repeat_interleave(2) / 2)


def test_diagonal_noisy_clone_is_still_the_same_function(tmp_path: Path) -> None:
    model, out = clone_and_export("gpt_neox", tmp_path, CloneConfig(factor=2, variant="diagonal", noise_db=10.0))
    tokens = sample_tokens(seed=4)
    assert relative_error(hf_logits(hf_load(out), tokens), hf_logits(model, tokens)) <= TOLERANCE


def test_wrong_clone_is_detected(tmp_path: Path) -> None:
    """The oracle is sensitive: a widened model whose tied final-norm fold is undone fails the tolerance."""
    model, out = clone_and_export("qwen2", tmp_path, CloneConfig(factor=2))
    wide = hf_load(out)
    wide.model.norm.weight.data *= 2
    tokens = sample_tokens(seed=5)
    assert relative_error(hf_logits(wide, tokens), hf_logits(model, tokens)) > 1e-2


def test_family_from_architecture_when_the_source_is_gone(tmp_path: Path) -> None:
    """Without the import record a Mistral clone is a Llama (the family that fits); --family still picks."""
    save_hf_model("mistral", tmp_path / "hf")
    small = import_hf_checkpoint(tmp_path / "hf", tmp_path / "small")
    wide = clone_checkpoint(small, tmp_path / "wide", CloneConfig(init_from=str(small), factor=2), 1, 1)
    shutil.rmtree(tmp_path / "small")
    assert json.loads((export_hf_checkpoint(wide, tmp_path / "a") / "config.json").read_text())["model_type"] == "llama"
    chosen = export_hf_checkpoint(wide, tmp_path / "b", family="mistral")
    assert json.loads((chosen / "config.json").read_text())["model_type"] == "mistral"


@pytest.mark.parametrize("case", ["gpt_neox", "qwen2", "llama", "opt_350m", "olmo2", "gemma"])
def test_widened_config_keeps_the_imported_options(case: str) -> None:
    cls, kwargs = CASES[case]
    _, cfg = config_from_hf(cls(**kwargs).to_dict())
    wide = widen_model_config(cfg, 2)
    for key in ("qkv_bias", "parallel_residual", "rope_fraction", "rope_scaling", "rope_scaling_factor", "rope_theta",
                "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len", "activation",
                "norm_placement", "final_norm", "norm_affine", "norm_unit_offset", "qk_norm", "scale_embeddings",
                "position_offset", "head_size", "tied_embeddings"):
        assert getattr(wide, key) == getattr(cfg, key), key
    assert wide.rope_size == cfg.rope_size  # the head size is kept, so the rotary dims are too
    assert wide.embedding_size == 2 * cfg.embedding_size


def test_widened_manifest_records_the_source(tmp_path: Path) -> None:
    save_hf_model("gpt2", tmp_path / "hf")
    small = import_hf_checkpoint(tmp_path / "hf", tmp_path / "small")
    wide = clone_checkpoint(small, tmp_path / "wide", CloneConfig(init_from=str(small), factor=2), 1, 1)
    assert read_manifest(wide).provenance["hyperclone"]["source"] == str(small.resolve())
