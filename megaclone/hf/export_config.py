"""The way back: which Hugging Face family expresses a megaclone config, and that family's config.json.

`infer_family` checks a config against what each family's architecture fixes (`_EXPRESSIBLE`, plus the biases and
head shapes) and lists every mismatch; `config_to_hf` writes config.json in the old spellings (`rope_theta`,
`rope_scaling`, `rotary_pct`), which every transformers version since 4.43 reads.
"""

from __future__ import annotations

import warnings
from typing import Any

from megaclone.config import ModelConfig
from megaclone.hf.families import (
    ARCHITECTURES,
    CARRIED_KEYS,
    FAMILIES,
    INFERRED_FAMILIES,
    TANH_GELUS,
    UnsupportedModelError,
)

_GELUS = ("gelu", "gelu_exact")
# What each family fixes: ModelConfig field (or property) -> the values it can express. Biases, grouped-query
# attention and the head size are checked in `_mismatches`.
_PLAIN = {"parallel_residual": (False,), "norm_affine": (True,), "norm_unit_offset": (False,),
          "norm_placement": ("pre",), "final_norm": (True,), "qk_norm": (False,), "scale_embeddings": (False,),
          "position_offset": (0,), "has_projections": (False,)}
_SWIGLU = {**_PLAIN, "activation": ("swiglu",), "norm": ("rmsnorm",), "position": ("rope",), "rope_fraction": (1.0,)}
_EXPRESSIBLE: dict[str, dict[str, tuple]] = {
    "llama": _SWIGLU, "mistral": _SWIGLU, "qwen2": _SWIGLU,
    "gpt_neox": {**_PLAIN, "activation": _GELUS, "norm": ("layernorm",), "position": ("rope",),
                 "parallel_residual": (False, True)},
    "gpt2": {**_PLAIN, "activation": _GELUS, "norm": ("layernorm",), "position": ("learned",)},
    "opt": {**_PLAIN, "activation": ("relu", *_GELUS), "norm": ("layernorm",), "norm_eps": (1e-5,),
            "norm_affine": (True, False), "norm_placement": ("pre", "post"), "final_norm": (True, False),
            "position": ("learned",), "position_offset": (2,), "has_projections": (False, True)},
    "olmo": {**_SWIGLU, "norm": ("layernorm",), "norm_eps": (1e-5,), "norm_affine": (False,)},
    "olmo2": {**_SWIGLU, "norm_placement": ("branch",), "qk_norm": (True,)},
    "gemma": {**_SWIGLU, "activation": ("geglu",), "norm_unit_offset": (True,), "scale_embeddings": (True,)},
}
_NO_BIAS = ("mistral", "olmo", "olmo2", "gemma")
_ALL_BIASES = ("gpt_neox", "gpt2")
_MHA = ("gpt_neox", "gpt2", "opt")  # no grouped-query attention
_HEADS_SPAN_HIDDEN = ("gpt_neox", "gpt2", "opt", "qwen2", "olmo", "olmo2")  # head size = hidden / heads
_NO_RESIDUAL_DROPOUT = ("llama", "mistral", "qwen2", "olmo", "olmo2", "gemma")


def _mismatches(cfg: ModelConfig, family: str) -> list[str]:
    """Why `family` cannot express `cfg` (empty: it can)."""
    why = [f"{key}={getattr(cfg, key)!r}" for key, allowed in _EXPRESSIBLE[family].items()
           if getattr(cfg, key) not in allowed]

    def need(ok: bool, text: str) -> None:
        if not ok:
            why.append(text)

    if family in _NO_BIAS:
        need(not cfg.bias and not cfg.has_qkv_bias, "linear biases")
    elif family in _ALL_BIASES:
        need(cfg.bias and cfg.has_qkv_bias, f"bias={cfg.bias}, qkv_bias={cfg.qkv_bias} (all linear biases needed)")
    elif family == "qwen2":
        need(not cfg.bias and cfg.has_qkv_bias,
             f"bias={cfg.bias}, qkv_bias={cfg.qkv_bias} (Qwen2 has q/k/v biases only)")
    else:  # llama, opt: all or none
        need(cfg.has_qkv_bias == cfg.bias, f"bias={cfg.bias} with qkv_bias={cfg.qkv_bias}")
    if family in _MHA:
        need(cfg.num_query_groups == cfg.num_heads, f"num_query_groups={cfg.num_query_groups} < num_heads "
             f"(grouped-query attention)")
    if family in _HEADS_SPAN_HIDDEN:
        need(cfg.head_size * cfg.num_heads == cfg.hidden_size, f"head_size={cfg.head_size} x num_heads != hidden_size")
    if family == "opt":
        need(not (cfg.final_norm and cfg.norm_placement == "post"), "final_norm=True with norm_placement='post'")
    return why


def infer_family(cfg: ModelConfig, family: str | None = None, hint: str | None = None) -> str:
    """The family to export `cfg` as: `family` when given (checked), else the source family `hint`, else the
    only inferred family that fits."""
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"--family {family!r}: expected one of {FAMILIES}")
        why = _mismatches(cfg, family)
        if why:
            raise UnsupportedModelError(f"the {family} family cannot express this model: {'; '.join(why)}")
        return family
    if hint in FAMILIES and not _mismatches(cfg, hint):
        return hint
    fits = [f for f in INFERRED_FAMILIES if not _mismatches(cfg, f)]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        reasons = "; ".join(f"{f}: {', '.join(_mismatches(cfg, f))}" for f in FAMILIES)
        raise UnsupportedModelError(f"no Hugging Face family expresses this model ({reasons})")
    raise ValueError(f"the model fits several families {fits}: choose one with --family")


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any] | None:
    if cfg.rope_scaling == "none":
        return None
    out: dict[str, Any] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
    if cfg.rope_scaling == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_seq_len)
    return out


def _activation_name(cfg: ModelConfig, key: str, base: dict[str, Any], tanh_name: str) -> str:
    """The source's own spelling when it means the same function (gelu_new stays gelu_new), else ours."""
    if cfg.activation in ("gelu_exact", "relu"):
        return {"gelu_exact": "gelu", "relu": "relu"}[cfg.activation]
    return base[key] if base.get(key) in TANH_GELUS else tanh_name


def _rope_decoder(cfg: ModelConfig) -> dict[str, Any]:
    """The keys of the rope decoders (Llama, Mistral, Qwen2, OLMo, OLMo-2, Gemma)."""
    return dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_query_groups,
                max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rope_scaling=_rope_to_hf(cfg),
                attention_dropout=cfg.attention_dropout)


def config_to_hf(cfg: ModelConfig, family: str, base: dict[str, Any] | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
    """config.json of `family` for `cfg` (checked with `infer_family`); token ids come from `base` when given."""
    infer_family(cfg, family)
    base = dict(base or {})
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[family]], "model_type": family,
                           "vocab_size": cfg.vocab_size, "torch_dtype": dtype,
                           "tie_word_embeddings": cfg.tied_embeddings, "initializer_range": cfg.init_std}
    if family in ("llama", "mistral", "qwen2"):
        out.update(_rope_decoder(cfg), hidden_act="silu", rms_norm_eps=cfg.norm_eps)
        if family != "qwen2":
            out["head_dim"] = cfg.head_size
        if family == "llama":
            out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
        elif family == "mistral":
            out["sliding_window"] = None
        else:
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    elif family in ("olmo", "olmo2"):
        out.update(_rope_decoder(cfg), hidden_act="silu", attention_bias=False)
        if family == "olmo":
            out["clip_qkv"] = None
        else:
            out["rms_norm_eps"] = cfg.norm_eps
    elif family == "gemma":  # hidden_activation: what transformers 4.x reads, hidden_act: 5.x
        out.update(_rope_decoder(cfg), head_dim=cfg.head_size, hidden_act="gelu_pytorch_tanh",
                   hidden_activation="gelu_pytorch_tanh", rms_norm_eps=cfg.norm_eps, attention_bias=False)
    elif family == "gpt_neox":
        out.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, hidden_act=_activation_name(cfg, "hidden_act", base,
                                                                                  "gelu_pytorch_tanh"),
                   max_position_embeddings=cfg.max_seq_len, layer_norm_eps=cfg.norm_eps,
                   rotary_pct=cfg.rope_fraction, rotary_emb_base=cfg.rope_theta, rope_scaling=_rope_to_hf(cfg),
                   use_parallel_residual=cfg.parallel_residual, attention_bias=True, hidden_dropout=cfg.dropout,
                   attention_dropout=cfg.attention_dropout)
    elif family == "opt":
        out.update(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, ffn_dim=cfg.ffn_size,
                   num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_seq_len,
                   word_embed_proj_dim=cfg.embedding_size, do_layer_norm_before=cfg.norm_placement == "pre",
                   _remove_final_layer_norm=cfg.norm_placement == "pre" and not cfg.final_norm,
                   activation_function=_activation_name(cfg, "activation_function", base, "gelu_new"),
                   enable_bias=cfg.bias, layer_norm_elementwise_affine=cfg.norm_affine, dropout=cfg.dropout,
                   attention_dropout=cfg.attention_dropout, layerdrop=0.0, init_std=cfg.init_std)
    else:
        out.update(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size,
                   n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                   activation_function=_activation_name(cfg, "activation_function", base, "gelu_new"),
                   resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attention_dropout,
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                   add_cross_attention=False)
    if family in _NO_RESIDUAL_DROPOUT and cfg.dropout > 0:
        warnings.warn(f"model.dropout={cfg.dropout} is dropped: the {family} family has no residual dropout",
                      stacklevel=2)
    out.update({k: base[k] for k in CARRIED_KEYS if k in base})
    return out
