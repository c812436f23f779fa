"""Model configs of the Hugging Face families megaclone reads: Llama, Mistral, Qwen2, GPT-NeoX, GPT-2, OPT, OLMo,
OLMo-2 and Gemma.

`config_from_hf` turns a `config.json` dict into a `ModelConfig` and refuses, by name, every feature the
megaclone model cannot compute (sliding-window attention, mixture of experts, ALiBi, cross-attention,
unsupported rope scaling, ...). It reads config.json as plain JSON, so old (`rope_theta`, `rope_scaling`,
`rotary_pct`) and new (`rope_parameters`) transformers spellings are understood. The way back (which family
expresses a megaclone config, and its config.json) is `megaclone.hf.export_config`.
"""

from __future__ import annotations

import warnings
from typing import Any

from megaclone.config import ConfigError, ModelConfig

FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox", "gpt2", "opt", "olmo", "olmo2", "gemma")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt_neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM",
                 "olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM", "gemma": "GemmaForCausalLM"}
# Export never picks mistral by itself: it is a Llama with a sliding window, which megaclone never has.
INFERRED_FAMILIES = ("llama", "qwen2", "gpt_neox", "gpt2", "opt", "olmo", "olmo2", "gemma")
# Later members of the supported families, refused by the features they add.
RELATED_MODEL_TYPES = {
    "gemma2": "Gemma-2's sliding-window layers (sliding_window, layer_types), attention and final logit "
              "soft-capping (attn_logit_softcapping, final_logit_softcapping), query_pre_attn_scalar and the norms "
              "after each branch",
    "gemma3": "Gemma-3's sliding-window layers (sliding_window, layer_types), per-head QK-norm and the norms after "
              "each branch",
    "gemma3_text": "Gemma-3's sliding-window layers (sliding_window, layer_types), per-head QK-norm and the norms "
                   "after each branch",
    "olmo3": "OLMo-3's sliding-window layers (sliding_window, layer_types)",
    "olmoe": "OLMoE's mixture of experts (num_experts)",
    "mixtral": "Mixtral's mixture of experts (num_local_experts)",
    "qwen2_moe": "Qwen2-MoE's mixture of experts (num_experts)",
}
CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # not architecture: copied from the source config
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


class UnsupportedModelError(ValueError):
    """A model uses a feature the other side cannot express; the message names the feature and the key."""


def _refuse(where: str, feature: str, detail: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}: megaclone cannot express {feature} ({detail})")


def _check_common(hf: dict[str, Any], family: str, where: str) -> None:
    """Refusals shared by every family, checked before anything family-specific."""
    if hf.get("quantization_config"):
        raise _refuse(where, "quantized weights", f"quantization_config={hf['quantization_config']!r}")
    for key in _MOE_KEYS:
        if hf.get(key):
            raise _refuse(where, "mixture of experts (MoE)", f"{key}={hf[key]!r}")
    if hf.get("alibi"):
        raise _refuse(where, "ALiBi attention biases", "alibi=true; megaclone has rope or learned positions")
    for key in ("add_cross_attention", "is_encoder_decoder"):
        if hf.get(key):
            raise _refuse(where, "cross-attention", f"{key}=true; megaclone is decoder-only")
    archs = hf.get("architectures") or [ARCHITECTURES[family]]
    if not all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UnsupportedModelError(f"{where}: architectures={archs}: only a causal LM head "
                                    f"({ARCHITECTURES[family]}) of model_type {family!r} can be imported")


def _rope_fields(hf: dict[str, Any], where: str, default_fraction: float) -> dict[str, Any]:
    """rope theta, rotary fraction and scaling from either spelling of the rope settings."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})  # transformers lets rope_scaling override rope_parameters
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    fraction = params.get("partial_rotary_factor",
                          hf.get("partial_rotary_factor", hf.get("rotary_pct", default_fraction)))
    fields: dict[str, Any] = {"rope_theta": float(theta), "rope_fraction": float(fraction)}
    if kind == "default":
        return fields
    if kind not in ("linear", "llama3"):
        raise _refuse(where, f"rope scaling type {kind!r}", "rope_scaling / rope_parameters; supported: "
                      "default, linear, llama3")
    fields.update(rope_scaling=kind, rope_scaling_factor=float(params["factor"]))
    if kind == "llama3":
        fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]),
                      rope_original_max_seq_len=int(params.get("original_max_position_embeddings",
                                                               hf["max_position_embeddings"])))
    return fields


def _gelu_kind(act: str, key: str, where: str) -> str:
    if act in TANH_GELUS:
        return "gelu"
    if act == "gelu":
        return "gelu_exact"
    raise _refuse(where, f"activation {act!r}", f"{key}; supported: gelu, {', '.join(TANH_GELUS)}")


def _decoder_fields(hf: dict[str, Any], family: str, where: str, tied: bool) -> dict[str, Any]:
    """The keys the Llama-like decoders (Llama, Mistral, Qwen2, OLMo, OLMo-2, Gemma) spell alike; `tied`: the
    family's default tie_word_embeddings."""
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = _rope_fields(hf, where, 1.0)
    if rope["rope_fraction"] != 1.0:
        raise _refuse(where, "partial rotary embeddings", f"partial_rotary_factor={rope['rope_fraction']}; the "
                      f"{family} family rotates whole heads")
    return dict(hidden_size=hidden, num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_query_groups=hf.get("num_key_value_heads") or heads,
                head_size=hf.get("head_dim") or hidden // heads, ffn_size=hf["intermediate_size"], position="rope",
                max_seq_len=hf["max_position_embeddings"], tied_embeddings=bool(hf.get("tie_word_embeddings", tied)),
                attention_dropout=float(hf.get("attention_dropout", 0.0)), **rope)


def _check_silu(hf: dict[str, Any], family: str, where: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _refuse(where, f"activation {act!r}", f"hidden_act; the {family} family maps only silu (SwiGLU)")


def _no_attention_bias(hf: dict[str, Any], family: str, where: str) -> None:
    if hf.get("attention_bias"):
        raise _refuse(where, "biases on attention but not on the MLP", f"attention_bias=true; the {family} MLP has "
                      "none, and megaclone has all linear biases or none (or q/k/v only)")


def _llama_like(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    window, max_pos = hf.get("sliding_window"), hf["max_position_embeddings"]
    if family == "mistral" and window is not None and window < max_pos:
        raise _refuse(where, "sliding-window attention", f"sliding_window={window} < max_position_embeddings="
                      f"{max_pos}; megaclone attends to the whole context")
    if family == "qwen2":
        layer_types = hf.get("layer_types")
        if layer_types is None and hf.get("use_sliding_window") and window is not None:
            layer_types = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
                           for i in range(hf["num_hidden_layers"])]
        if window is not None and window < max_pos and "sliding_attention" in (layer_types or []):
            raise _refuse(where, "sliding-window attention", f"use_sliding_window / layer_types with sliding_window="
                          f"{window} < max_position_embeddings={max_pos}")
    _check_silu(hf, family, where)
    if family == "llama":
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise _refuse(where, "biases on attention but not on the MLP (or the reverse)",
                          f"attention_bias={attn_bias}, mlp_bias={mlp_bias}; megaclone has all linear biases or none")
        bias: dict[str, Any] = {"bias": attn_bias}
    elif family == "qwen2":
        bias = {"bias": False, "qkv_bias": True}
    else:
        bias = {"bias": False}
    return dict(_decoder_fields(hf, family, where, tied=False), activation="swiglu", norm="rmsnorm",
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), **bias)


def _olmo(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    """OLMo: LayerNorm without parameters (eps fixed at 1e-5). OLMo-2: RMSNorm on each branch's output, QK-norm."""
    if hf.get("clip_qkv") is not None:
        raise _refuse(where, "clipped q/k/v activations", f"clip_qkv={hf['clip_qkv']}")
    _check_silu(hf, family, where)
    _no_attention_bias(hf, family, where)
    norms: dict[str, Any] = dict(norm="layernorm", norm_affine=False, norm_eps=1e-5) if family == "olmo" else dict(
        norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-5)), norm_placement="branch", qk_norm=True)
    return dict(_decoder_fields(hf, family, where, tied=False), activation="swiglu", bias=False, **norms)


def _gemma(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Gemma: embeddings times sqrt(hidden), RMSNorm with gain 1 + weight, tanh-GELU-gated MLP, tied by default."""
    for key in ("hidden_act", "hidden_activation"):
        act = hf.get(key)  # transformers reads the legacy "gelu" of the released configs as the tanh GELU
        if act is not None and act != "gelu" and act not in TANH_GELUS:
            raise _refuse(where, f"activation {act!r}", f"{key}; Gemma's MLP is gated by the tanh GELU")
    if hf.get("use_bidirectional_attention"):
        raise _refuse(where, "bidirectional attention", "use_bidirectional_attention=true; megaclone is causal")
    _no_attention_bias(hf, "gemma", where)
    return dict(_decoder_fields(hf, "gemma", where, tied=True), activation="geglu", norm="rmsnorm",
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm_unit_offset=True, scale_embeddings=True, bias=False)


def _gpt_neox(hf: dict[str, Any], where: str) -> dict[str, Any]:
    if not hf.get("attention_bias", True):
        raise _refuse(where, "GPT-NeoX without attention biases", "attention_bias=false while the MLP keeps its "
                      "biases; megaclone has all linear biases or none")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    activation = _gelu_kind(hf.get("hidden_act", "gelu"), "hidden_act", where)
    return dict(hidden_size=hidden, num_layers=hf["num_hidden_layers"], num_heads=heads, head_size=hidden // heads,
                ffn_size=hf["intermediate_size"], activation=activation,
                norm="layernorm", norm_eps=float(hf.get("layer_norm_eps", 1e-5)), position="rope",
                max_seq_len=hf["max_position_embeddings"], bias=True,
                tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
                parallel_residual=bool(hf.get("use_parallel_residual", True)),
                dropout=float(hf.get("hidden_dropout", 0.0)), attention_dropout=float(hf.get("attention_dropout", 0.0)),
                **_rope_fields(hf, where, 0.25))


def _gpt2(hf: dict[str, Any], where: str) -> dict[str, Any]:
    if not hf.get("scale_attn_weights", True):
        raise _refuse(where, "unscaled attention scores", "scale_attn_weights=false")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise _refuse(where, "attention scaled by 1/layer index", "scale_attn_by_inverse_layer_idx=true")
    hidden, heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    resid, embd = float(hf.get("resid_pdrop", 0.1)), float(hf.get("embd_pdrop", 0.1))
    if resid != embd:
        warnings.warn(f"{where}: embd_pdrop={embd} differs from resid_pdrop={resid}; megaclone uses one dropout "
                      f"for both and takes resid_pdrop", stacklevel=3)
    return dict(hidden_size=hidden, num_layers=hf.get("n_layer", 12), num_heads=heads, head_size=hidden // heads,
                ffn_size=hf.get("n_inner") or 4 * hidden,
                activation=_gelu_kind(hf.get("activation_function", "gelu_new"), "activation_function", where),
                norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position="learned",
                max_seq_len=hf.get("n_positions", 1024), bias=True,
                tied_embeddings=bool(hf.get("tie_word_embeddings", True)), dropout=resid,
                attention_dropout=float(hf.get("attn_pdrop", 0.1)))


def _opt(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """OPT: learned positions at offset 2, ReLU, post-norm blocks without a final norm when do_layer_norm_before is
    false (OPT-350m), project_in / project_out when word_embed_proj_dim differs from the hidden size."""
    if hf.get("layerdrop"):
        raise _refuse(where, "LayerDrop", f"layerdrop={hf['layerdrop']}; megaclone runs every layer")
    act = hf.get("activation_function", "relu")
    activation = "relu" if act == "relu" else _gelu_kind(act, "activation_function", where)
    hidden, heads = hf.get("hidden_size", 768), hf.get("num_attention_heads", 12)
    pre = bool(hf.get("do_layer_norm_before", True))
    embed = hf.get("word_embed_proj_dim") or hidden
    return dict(hidden_size=hidden, num_layers=hf.get("num_hidden_layers", 12), num_heads=heads,
                head_size=hidden // heads, ffn_size=hf.get("ffn_dim", 3072), activation=activation, norm="layernorm",
                norm_eps=1e-5, norm_affine=bool(hf.get("layer_norm_elementwise_affine", True)),
                norm_placement="pre" if pre else "post",
                final_norm=pre and not hf.get("_remove_final_layer_norm", False), position="learned",
                position_offset=2, max_seq_len=hf.get("max_position_embeddings", 2048),
                bias=bool(hf.get("enable_bias", True)), tied_embeddings=bool(hf.get("tie_word_embeddings", True)),
                dropout=float(hf.get("dropout", 0.1)), attention_dropout=float(hf.get("attention_dropout", 0.0)),
                embed_size=None if embed == hidden else embed)


def config_from_hf(hf: dict[str, Any], vocab_multiple: int = 128,
                   where: str = "config.json") -> tuple[str, ModelConfig]:
    """(family, ModelConfig) of an HF config.json dict; UnsupportedModelError names what cannot be expressed."""
    family = hf.get("model_type")
    if family in RELATED_MODEL_TYPES:
        raise _refuse(where, RELATED_MODEL_TYPES[family], f"model_type={family!r}; megaclone imports "
                      f"{', '.join(FAMILIES)}")
    if family not in FAMILIES:
        raise UnsupportedModelError(f"{where}: model_type={family!r} is not supported; megaclone imports "
                                    f"{', '.join(FAMILIES)}")
    _check_common(hf, family, where)
    try:
        if family in ("gpt_neox", "gpt2", "opt", "gemma"):
            fields = {"gpt_neox": _gpt_neox, "gpt2": _gpt2, "opt": _opt, "gemma": _gemma}[family](hf, where)
        elif family in ("olmo", "olmo2"):
            fields = _olmo(hf, family, where)
        else:
            fields = _llama_like(hf, family, where)
        vocab = hf.get("vocab_size", {"gpt2": 50257, "opt": 50272}.get(family))
        if not isinstance(vocab, int) or vocab <= 0:
            raise UnsupportedModelError(f"{where}: vocab_size={vocab!r} must be a positive integer")
        cfg = ModelConfig(vocab_size=vocab, vocab_multiple=vocab_multiple,
                          init_std=float(hf.get("initializer_range", hf.get("init_std", 0.02))), **fields)
    except KeyError as e:
        raise UnsupportedModelError(f"{where}: missing key {e} needed for model_type={family!r}") from e
    except ConfigError as e:
        raise UnsupportedModelError(f"{where}: the {family} model does not fit a megaclone config: {e}") from e
    return family, cfg
