"""What megaclone cannot compute is refused, naming the feature, before anything is written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaclone.config import ConfigError, ModelConfig
from megaclone.hf import (
    OutputExistsError,
    UnsupportedModelError,
    export_hf_checkpoint,
    import_hf_checkpoint,
    infer_family,
)
from tests.hf.helpers import CASES, save_hf_model


def write_config(directory: Path, case: str, **changes) -> Path:
    """config.json of `case` with `changes` (None deletes a key); no weights needed: config refusals come first."""
    cls, kwargs = CASES[case]
    config = cls(**kwargs).to_dict()
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


REFUSALS = [
    ("mistral", dict(sliding_window=4096, max_position_embeddings=32768), "sliding-window attention"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0, layer_types=None),
     "sliding-window attention"),
    ("qwen2", dict(layer_types=["full_attention", "sliding_attention"], sliding_window=8), "sliding-window"),
    ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None),
     "rope scaling type 'yarn'"),
    ("llama", dict(rope_scaling=None, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "rope scaling type 'dynamic'"),
    ("llama", dict(model_type="mixtral"), r"Mixtral's mixture of experts \(num_local_experts\) \(model_type='mixtral'"),
    ("llama", dict(num_local_experts=8), r"mixture of experts \(MoE\) .*num_local_experts=8"),
    ("qwen2", dict(num_experts=4), "mixture of experts"),
    ("gpt_neox", dict(model_type="bloom"), "model_type='bloom'"),
    ("gpt_neox", dict(alibi=True), "ALiBi"),
    ("gpt2", dict(add_cross_attention=True), "cross-attention"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("gpt2", dict(activation_function="relu"), "activation 'relu'"),
    ("llama", dict(attention_bias=True, mlp_bias=False), "attention_bias=True, mlp_bias=False"),
    ("llama", dict(hidden_act="gelu"), "activation 'gelu'"),
    ("llama", dict(quantization_config={"quant_method": "gptq"}), "quantized weights"),
    ("gpt_neox", dict(attention_bias=False), "attention_bias=false"),
    ("llama", dict(architectures=["LlamaForSequenceClassification"]), "causal LM head"),
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial rotary"),
    ("gemma", dict(model_type="gemma2"), r"Gemma-2's sliding-window layers \(sliding_window, layer_types\), "
                                         "attention and final logit soft-capping"),
    ("gemma", dict(model_type="gemma3_text"), "Gemma-3's sliding-window layers"),
    ("olmo2", dict(model_type="olmo3"), r"OLMo-3's sliding-window layers .*model_type='olmo3'"),
    ("olmo", dict(model_type="olmoe"), "mixture of experts"),
    ("gemma", dict(use_bidirectional_attention=True), "bidirectional attention"),
    ("gemma", dict(hidden_act="relu"), "activation 'relu' .*hidden_act; Gemma's MLP is gated by the tanh GELU"),
    ("gemma", dict(attention_bias=True), "biases on attention but not on the MLP .*attention_bias=true"),
    ("olmo", dict(clip_qkv=8.0), r"clipped q/k/v activations \(clip_qkv=8.0\)"),
    ("olmo2", dict(attention_bias=True), "biases on attention but not on the MLP"),
    ("olmo2", dict(hidden_act="gelu"), "activation 'gelu'"),
    ("opt", dict(layerdrop=0.1), r"LayerDrop \(layerdrop=0.1"),
    ("opt", dict(activation_function="silu"), "activation 'silu'"),
]


@pytest.mark.parametrize("case,changes,message", REFUSALS)
def test_unsupported_features_are_refused_by_name(case: str, changes: dict, message: str, tmp_path: Path) -> None:
    hf_dir = write_config(tmp_path / "hf", case, **changes)
    with pytest.raises(UnsupportedModelError, match=message):
        import_hf_checkpoint(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mistral_window_as_long_as_the_context_is_accepted(tmp_path: Path) -> None:
    save_hf_model("mistral", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["sliding_window"] = config["max_position_embeddings"]  # a window that never cuts anything
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert (import_hf_checkpoint(tmp_path / "hf", tmp_path / "out") / "manifest.json").is_file()


def test_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        import_hf_checkpoint(tmp_path / "empty", tmp_path / "out")
    hf_dir = write_config(tmp_path / "hf", "llama")
    torch.save({}, hf_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no safetensors weights .*pytorch_model.bin.*never loaded"):
        import_hf_checkpoint(hf_dir, tmp_path / "out")


def _rewrite(hf_dir: Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({"model.layers.0.mlp.experts.0.weight": torch.zeros(2, 2)}), "experts.0.weight"),
    (lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(64, 31)}),
     r"up_proj.weight has shape \[64, 31\], config.json implies \[64, 32\]"),
    (lambda t: t.pop("model.norm.weight"), "model.norm.weight .* is missing"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(32, dtype=torch.int8)}), "dtype I8"),
])
def test_weights_that_do_not_match_the_config(edit, message: str, tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "hf")
    _rewrite(tmp_path / "hf", edit)
    with pytest.raises(ValueError, match=message):
        import_hf_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_index_paths_must_stay_inside(tmp_path: Path) -> None:
    hf_dir = write_config(tmp_path / "hf", "llama")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="must be a path inside"):
        import_hf_checkpoint(hf_dir, tmp_path / "out")


def test_layout_and_output_are_checked_first(tmp_path: Path) -> None:
    save_hf_model("gpt2", tmp_path / "hf")
    with pytest.raises(ConfigError, match="tp_size=3"):
        import_hf_checkpoint(tmp_path / "hf", tmp_path / "out", tp_size=3)
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        import_hf_checkpoint(tmp_path / "hf", tmp_path / "taken")
    step_dir = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    with pytest.raises(OutputExistsError, match="already exists"):
        export_hf_checkpoint(step_dir, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_export_refuses_what_no_family_expresses(tmp_path: Path) -> None:
    gqa_layernorm = ModelConfig(vocab_size=100, hidden_size=32, num_heads=4, num_query_groups=2)
    with pytest.raises(UnsupportedModelError, match=r"no Hugging Face family .*gpt_neox: num_query_groups=2"):
        infer_family(gqa_layernorm)
    no_bias_gelu = ModelConfig(vocab_size=100, hidden_size=32, num_heads=4, bias=False)
    with pytest.raises(UnsupportedModelError, match="all linear biases needed"):
        infer_family(no_bias_gelu)
    assert infer_family(ModelConfig(vocab_size=100)) == "gpt_neox"  # megaclone's default model is a NeoX
    save_hf_model("gpt_neox", tmp_path / "hf")
    step_dir = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    with pytest.raises(UnsupportedModelError, match="the llama family cannot express .*norm='layernorm'"):
        export_hf_checkpoint(step_dir, tmp_path / "out", family="llama")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--dtype 'int8'"):
        export_hf_checkpoint(step_dir, tmp_path / "out", dtype="int8")


def test_export_names_the_family_options_a_family_lacks() -> None:
    olmo2 = ModelConfig(vocab_size=100, hidden_size=32, num_heads=4, activation="swiglu", norm="rmsnorm", bias=False,
                        norm_placement="branch", qk_norm=True)
    assert infer_family(olmo2) == "olmo2"
    with pytest.raises(UnsupportedModelError, match="the llama family cannot express .*norm_placement='branch'; "
                                                    "qk_norm=True"):
        infer_family(olmo2, "llama")
    post_with_final = ModelConfig(vocab_size=100, hidden_size=32, num_heads=4, activation="relu", position="learned",
                                  position_offset=2, norm_placement="post")
    with pytest.raises(UnsupportedModelError, match="opt: final_norm=True with norm_placement='post'"):
        infer_family(post_with_final)
    assert infer_family(dataclasses.replace(post_with_final, final_norm=False)) == "opt"
    olmo_eps = ModelConfig(vocab_size=100, hidden_size=32, num_heads=4, activation="swiglu", bias=False,
                           norm_affine=False, norm_eps=1e-6)
    with pytest.raises(UnsupportedModelError, match=r"olmo: norm_eps=1e-06"):  # OLMo's LayerNorm fixes 1e-5
        infer_family(olmo_eps)
