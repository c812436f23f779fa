"""Shared helpers of the Hugging Face interop tests: tiny random transformers models saved locally.

Every weight, norm and bias is randomised (transformers initialises norms to ones and biases to zeros,
which would hide a wrong mapping of them), and the vocabulary (100) is not a multiple of the padding.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

VOCAB = 100
SEQ = 16
_LLAMA_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5)
_OPT_BASE = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32, dropout=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=2)
_OLMO_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, rope_theta=1000.0, eos_token_id=1, pad_token_id=2)

# family -> (config class, kwargs): each exercises the options that family brings.
CASES = {
    "llama": (transformers.LlamaConfig, dict(_LLAMA_BASE, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8})),
    "llama_bias_tied": (transformers.LlamaConfig, dict(_LLAMA_BASE, attention_bias=True, mlp_bias=True,
                                                       tie_word_embeddings=True, num_key_value_heads=4)),
    "mistral": (transformers.MistralConfig, dict(_LLAMA_BASE, sliding_window=None,
                                                 rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2": (transformers.Qwen2Config, dict(_LLAMA_BASE, tie_word_embeddings=True, rope_theta=1000.0)),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, rotary_pct=0.25, rotary_emb_base=100.0, hidden_act="gelu")),
    "gpt_neox_sequential_tied": (transformers.GPTNeoXConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, rotary_pct=0.5, use_parallel_residual=False, tie_word_embeddings=True,
        hidden_act="gelu_new")),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                           bos_token_id=0, eos_token_id=0)),
    # the opt-125m layout: word_embed_proj_dim == hidden, pre-norm, tied
    "opt": (transformers.OPTConfig, _OPT_BASE),
    # the opt-350m layout: a narrower embedding with project_in / project_out, post-norm, no final norm, tied
    "opt_350m": (transformers.OPTConfig, dict(_OPT_BASE, word_embed_proj_dim=16, do_layer_norm_before=False)),
    "opt_350m_untied_plain": (transformers.OPTConfig, dict(
        _OPT_BASE, word_embed_proj_dim=16, do_layer_norm_before=False, tie_word_embeddings=False, enable_bias=False,
        layer_norm_elementwise_affine=False, activation_function="gelu")),
    "olmo_tied": (transformers.OlmoConfig, dict(_OLMO_BASE, tie_word_embeddings=True)),  # like OLMo-1B
    "olmo": (transformers.OlmoConfig, _OLMO_BASE),
    "olmo2": (transformers.Olmo2Config, _OLMO_BASE),
    "olmo2_tied": (transformers.Olmo2Config, dict(_OLMO_BASE, tie_word_embeddings=True, num_key_value_heads=4)),
    # head_dim 16 with 4 heads: 64 wide attention in a 32 wide model
    "gemma": (transformers.GemmaConfig, dict(_LLAMA_BASE, head_dim=16, rms_norm_eps=1e-6, bos_token_id=0,
                                             eos_token_id=1, pad_token_id=2)),
    "gemma_untied": (transformers.GemmaConfig, dict(_LLAMA_BASE, head_dim=8, num_key_value_heads=4,
                                                    tie_word_embeddings=False)),
}
FAMILY_OF = {case: cls.model_type for case, (cls, _) in CASES.items()}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights like a trained model's: norms near one, biases and embeddings clearly non-zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        r = torch.randn(p.shape, generator=g)
        if p.dim() == 1:
            is_norm_weight = name.endswith("weight")  # every 1-D weight is a norm's
            p.copy_(1.0 + 0.2 * r if is_norm_weight else 0.2 * r)
        elif "embed" in name or "wte" in name or "wpe" in name:
            p.copy_(0.4 * r)  # tied unembedding: logits O(10), so fp32 rounding stays well under 1e-5
        else:
            fan_in = p.shape[0] if "transformer.h." in name else p.shape[1]  # GPT-2's Conv1D is [in, out]
            p.copy_(r / fan_in ** 0.5)


@functools.cache
def hf_model(case: str, seed: int = 0) -> transformers.PreTrainedModel:
    """The tiny random fp32 model of `case` (built once per seed)."""
    cls, kwargs = CASES[case]
    model = transformers.AutoModelForCausalLM.from_config(cls(**kwargs), attn_implementation="sdpa")
    randomize(model, seed)
    return model.eval()


def save_hf_model(case: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                  **save_kwargs) -> transformers.PreTrainedModel:
    """A tiny random model of `case` saved (safetensors) to `directory`; returns the fp32 model."""
    model = hf_model(case, seed)
    to_save = model if dtype == torch.float32 else transformers.AutoModelForCausalLM.from_config(
        model.config, dtype=dtype)
    if to_save is not model:
        to_save.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    to_save.save_pretrained(directory, **save_kwargs)
    write_tokenizer_json(directory)
    return model


def write_tokenizer_json(directory: Path) -> Path:
    """A word-level HF tokenizer of exactly VOCAB tokens (<s>, </s>, <pad>, then w3 .. w99) with its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = Path(directory) / "tokenizer.json"
    tokenizer.save(str(path))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": SEQ}
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def sample_tokens(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model: transformers.PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits.float()


def hf_load(directory: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in an HF directory."""
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out
