"""Model configs of the Hugging Face families megaclone reads and writes: Llama, Mistral, Qwen2, GPT-NeoX, GPT-2.

`config_from_hf` turns a `config.json` dict into a `ModelConfig` and refuses, by name, every feature the
megaclone model cannot compute (sliding-window attention, mixture of experts, ALiBi, cross-attention,
unsupported rope scaling, ...). `config_to_hf` is the inverse for export and refuses a megaclone config
that the chosen family cannot express. Both read config.json as plain JSON, so old (`rope_theta`,
`rope_scaling`, `rotary_pct`) and new (`rope_parameters`) transformers spellings are understood; export
writes the old spellings, which every transformers version since 4.43 reads.
"""

from __future__ import annotations

import warnings
from typing import Any

from megaclone.config import ConfigError, ModelConfig

FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox", "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt_neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel"}
# Export never picks mistral by itself: it is a Llama with a sliding window, which megaclone never has.
INFERRED_FAMILIES = ("llama", "qwen2", "gpt_neox", "gpt2")
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


def _llama_like(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
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
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _refuse(where, f"activation {act!r}", f"hidden_act; the {family} family maps only silu (SwiGLU)")
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
    rope = _rope_fields(hf, where, 1.0)
    if rope["rope_fraction"] != 1.0:
        raise _refuse(where, "partial rotary embeddings", f"partial_rotary_factor={rope['rope_fraction']}; the "
                      f"{family} family rotates whole heads")
    return dict(hidden_size=hidden, num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_query_groups=hf.get("num_key_value_heads") or heads,
                head_size=hf.get("head_dim") or hidden // heads, ffn_size=hf["intermediate_size"],
                activation="swiglu", norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope",
                max_seq_len=max_pos, tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_dropout=float(hf.get("attention_dropout", 0.0)), **bias, **rope)


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


def config_from_hf(hf: dict[str, Any], vocab_multiple: int = 128,
                   where: str = "config.json") -> tuple[str, ModelConfig]:
    """(family, ModelConfig) of an HF config.json dict; UnsupportedModelError names what cannot be expressed."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedModelError(f"{where}: model_type={family!r} is not supported; megaclone imports "
                                    f"{', '.join(FAMILIES)}")
    _check_common(hf, family, where)
    try:
        if family == "gpt_neox":
            fields = _gpt_neox(hf, where)
        elif family == "gpt2":
            fields = _gpt2(hf, where)
        else:
            fields = _llama_like(hf, family, where)
        vocab = hf.get("vocab_size", 50257 if family == "gpt2" else None)
        if not isinstance(vocab, int) or vocab <= 0:
            raise UnsupportedModelError(f"{where}: vocab_size={vocab!r} must be a positive integer")
        cfg = ModelConfig(vocab_size=vocab, vocab_multiple=vocab_multiple,
                          init_std=float(hf.get("initializer_range", 0.02)), **fields)
    except KeyError as e:
        raise UnsupportedModelError(f"{where}: missing key {e} needed for model_type={family!r}") from e
    except ConfigError as e:
        raise UnsupportedModelError(f"{where}: the {family} model does not fit a megaclone config: {e}") from e
    return family, cfg


# --- export ------------------------------------------------------------------------------------------------

def _mismatches(cfg: ModelConfig, family: str) -> list[str]:
    """Why `family` cannot express `cfg` (empty: it can)."""
    why = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            why.append(text)

    llama_like = family in ("llama", "mistral", "qwen2")
    need(cfg.activation == "swiglu" if llama_like else cfg.activation in ("gelu", "gelu_exact"),
         f"activation={cfg.activation!r}")
    need(cfg.norm == ("rmsnorm" if llama_like else "layernorm"), f"norm={cfg.norm!r}")
    need(cfg.position == ("learned" if family == "gpt2" else "rope"), f"position={cfg.position!r}")
    need(cfg.parallel_residual is False or family == "gpt_neox", "parallel_residual=True")
    if cfg.position == "rope":
        need(cfg.rope_fraction == 1.0 or family == "gpt_neox", f"rope_fraction={cfg.rope_fraction}")
    if family == "llama":
        need(cfg.has_qkv_bias == cfg.bias, f"bias={cfg.bias} with qkv_bias={cfg.qkv_bias}")
    elif family == "mistral":
        need(not cfg.bias and not cfg.has_qkv_bias, "linear biases")
    elif family == "qwen2":
        need(not cfg.bias and cfg.has_qkv_bias,
             f"bias={cfg.bias}, qkv_bias={cfg.qkv_bias} (Qwen2 has q/k/v biases only)")
    else:
        need(cfg.bias and cfg.has_qkv_bias, f"bias={cfg.bias}, qkv_bias={cfg.qkv_bias} (all linear biases needed)")
        need(cfg.num_query_groups == cfg.num_heads, f"num_query_groups={cfg.num_query_groups} < num_heads "
             f"(grouped-query attention)")
        need(cfg.head_size * cfg.num_heads == cfg.hidden_size, f"head_size={cfg.head_size} x num_heads != hidden_size")
    if family == "qwen2":
        need(cfg.head_size * cfg.num_heads == cfg.hidden_size, f"head_size={cfg.head_size} x num_heads != hidden_size")
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
    if cfg.activation == "gelu_exact":
        return "gelu"
    return base[key] if base.get(key) in TANH_GELUS else tanh_name


def config_to_hf(cfg: ModelConfig, family: str, base: dict[str, Any] | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
    """config.json of `family` for `cfg` (checked with `infer_family`); token ids come from `base` when given."""
    infer_family(cfg, family)
    base = dict(base or {})
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[family]], "model_type": family,
                           "vocab_size": cfg.vocab_size, "torch_dtype": dtype,
                           "tie_word_embeddings": cfg.tied_embeddings, "initializer_range": cfg.init_std}
    if family in ("llama", "mistral", "qwen2"):
        out.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_query_groups, hidden_act="silu",
                   max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                   rope_scaling=_rope_to_hf(cfg), attention_dropout=cfg.attention_dropout)
        if family != "qwen2":
            out["head_dim"] = cfg.head_size
        if family == "llama":
            out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
        elif family == "mistral":
            out["sliding_window"] = None
        else:
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    elif family == "gpt_neox":
        out.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, hidden_act=_activation_name(cfg, "hidden_act", base,
                                                                                  "gelu_pytorch_tanh"),
                   max_position_embeddings=cfg.max_seq_len, layer_norm_eps=cfg.norm_eps,
                   rotary_pct=cfg.rope_fraction, rotary_emb_base=cfg.rope_theta, rope_scaling=_rope_to_hf(cfg),
                   use_parallel_residual=cfg.parallel_residual, attention_bias=True, hidden_dropout=cfg.dropout,
                   attention_dropout=cfg.attention_dropout)
    else:
        out.update(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size,
                   n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                   activation_function=_activation_name(cfg, "activation_function", base, "gelu_new"),
                   resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attention_dropout,
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                   add_cross_attention=False)
    if family in ("llama", "mistral", "qwen2") and cfg.dropout > 0:
        warnings.warn(f"model.dropout={cfg.dropout} is dropped: the {family} family has no residual dropout",
                      stacklevel=2)
    out.update({k: base[k] for k in CARRIED_KEYS if k in base})
    return out
