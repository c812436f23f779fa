"""Decoder-only GPT built from tensor-parallel layers.

Parameter names equal the global names of the parameter-spec table (`megaclone.spec`) at every TP
degree; each rank holds its TP slice. The same layer classes are the stages of the DeepSpeed
pipeline (`megaclone.model.pipeline`). Nothing here knows about DeepSpeed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megaclone.config import ModelConfig
from megaclone.parallel import (
    ColumnParallelLinear,
    ColumnParallelNorm,
    RowParallelLinear,
    TPGroup,
    TPRNGTracker,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_from_tp_region,
    vocab_parallel_cross_entropy,
)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm left unfilled, like the parallel layers: its values come from the spec table or a checkpoint,
    so a load never overwrites an initialisation (a cloned or resumed launch writes every parameter once)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm left unfilled (see LayerNorm)."""

    def reset_parameters(self) -> None:
        pass


class PositionEmbedding(nn.Embedding):
    """Learned positions, nn.Embedding left unfilled (see LayerNorm)."""

    def reset_parameters(self) -> None:
        pass


class UnitOffsetNorm(nn.Module):
    """RMSNorm or LayerNorm whose gain is 1 + weight, computed in fp32 as Gemma's RMSNorm: weight 0 is the identity."""

    def __init__(self, size: int, eps: float, rms: bool):
        super().__init__()
        self.size, self.eps, self.rms = size, eps, rms
        self.weight = nn.Parameter(torch.zeros(size))  # the identity, as nn.LayerNorm starts
        self.bias = None if rms else nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = F.rms_norm if self.rms else F.layer_norm
        y = norm(x.float(), (self.size,), eps=self.eps) * (1.0 + self.weight.float())
        return (y if self.bias is None else y + self.bias.float()).type_as(x)


def norm_class(cfg: ModelConfig, size: int | None = None) -> tuple[type[nn.Module], dict]:
    """Class and arguments of the model's norm over `size` features (default: hidden), as DeepSpeed's LayerSpec
    takes them. NVIDIA apex's fused kernels when installed on GPU (same parameters, same math)."""
    size = size or cfg.hidden_size
    rms = cfg.norm == "rmsnorm"
    if cfg.norm_unit_offset:
        return UnitOffsetNorm, dict(size=size, eps=cfg.norm_eps, rms=rms)
    cls: type[nn.Module] = RMSNorm if rms else LayerNorm  # unfilled: the spec table or a checkpoint fills it
    if torch.cuda.is_available():
        try:  # optional accelerator
            from apex.normalization import FusedLayerNorm, FusedRMSNorm

            cls = FusedRMSNorm if rms else FusedLayerNorm
        except ImportError:
            pass
    return cls, dict(normalized_shape=size, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)


def build_norm(cfg: ModelConfig, size: int | None = None) -> nn.Module:
    """LayerNorm or RMSNorm over `size` features (default: the hidden axis), with the config's options."""
    cls, kwargs = norm_class(cfg, size)
    return cls(**kwargs)


def activation_fn(cfg: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP's elementwise function (of the gate, for the gated activations)."""
    return {"gelu": functools.partial(F.gelu, approximate="tanh"), "gelu_exact": F.gelu, "relu": F.relu,
            "swiglu": F.silu, "geglu": functools.partial(F.gelu, approximate="tanh")}[cfg.activation]


def residual(x: torch.Tensor, branch: nn.Module, norm: nn.Module, placement: str, dropout: nn.Module) -> torch.Tensor:
    """One residual step with the norm where the config puts it (`ModelConfig.norm_placement`)."""
    if placement == "pre":
        return x + dropout(branch(norm(x)))
    if placement == "post":  # OPT-350m: the residual stream itself is normed
        return norm(x + dropout(branch(x)))
    return x + dropout(norm(branch(x)))  # "branch": the norm on the branch's output (OLMo-2)


@dataclass(frozen=True)
class Rope:
    """Rotary embedding settings, read from the config once at build time (plain values: no buffers to move)."""

    size: int  # leading dims of each head that rotate: head_size, or a fraction of it (GPT-NeoX)
    theta: float
    scaling: str = "none"  # none | linear | llama3 (long-context models stretch the low frequencies)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """Frequencies [size / 2] in fp32, computed as Hugging Face's rope functions do (same order of ops)."""
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.size, 2, device=device, dtype=torch.float32) / self.size)
        if self.scaling == "linear":
            return inv_freq / self.factor
        if self.scaling == "llama3":  # divide low frequencies by factor, keep high ones, interpolate between
            low_wavelen = self.original_max_seq_len / self.low_freq_factor
            high_wavelen = self.original_max_seq_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (self.original_max_seq_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv_freq

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [seq, size] for rotate-half rotary embeddings, in fp32."""
        angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.inv_freq(device))
        angles = torch.cat([angles, angles], dim=-1)  # [seq, size]
        return angles.cos(), angles.sin()


def build_rope(cfg: ModelConfig) -> Rope | None:
    """The rotary settings of `cfg`, or None for learned positions."""
    if cfg.position != "rope":
        return None
    return Rope(cfg.rope_size, cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                cfg.rope_high_freq_factor, cfg.rope_original_max_seq_len)


def cached_cos_sin(rope: Rope, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope.cos_sin(seq_len, device)`, computed once: every layer of every step asks for the same tables.

    Callers must not modify them in place. Under `torch.compile` they are computed in the graph instead (Dynamo
    would trace through the cache anyway, with a warning).
    """
    if torch.compiler.is_compiling():
        return rope.cos_sin(seq_len, device)
    return _cos_sin_cache(rope, seq_len, device)


@functools.lru_cache(maxsize=16)
def _cos_sin_cache(rope: Rope, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Keyed by the settings, length and device; always fp32 (`apply_rope` computes in fp32 for any input dtype).
    Built outside inference mode, so tables first asked for under `torch.inference_mode` still serve training."""
    with torch.inference_mode(False):
        return rope.cos_sin(seq_len, device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading cos.shape[-1] dims of x [batch, heads, seq, head_size] by position; the rest pass."""
    size = cos.shape[-1]
    if size < x.shape[-1]:  # partial rotary (GPT-NeoX)
        return torch.cat([apply_rope(x[..., :size], cos, sin), x[..., size:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention; this rank computes whole query groups (their q heads, k and v)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, rng: TPRNGTracker | None):
        super().__init__()
        self.groups = cfg.num_query_groups // tp.size  # groups on this rank
        self.heads_per_group, self.head_size = cfg.heads_per_group, cfg.head_size
        self.rope = build_rope(cfg)
        self.dropout_p, self.rng = cfg.attention_dropout, rng
        unit = (self.heads_per_group + 2) * cfg.head_size
        self.qkv = ColumnParallelLinear(cfg.hidden_size, cfg.num_query_groups * unit, tp, cfg.has_qkv_bias)
        if cfg.qk_norm:  # over all heads of all ranks (OLMo-2)
            self.q_norm, self.k_norm = (
                ColumnParallelNorm(size * cfg.head_size, tp, cfg.norm_eps, cfg.norm == "rmsnorm", cfg.norm_affine,
                                   cfg.norm_unit_offset) for size in (cfg.num_heads, cfg.num_query_groups))
        else:
            self.q_norm = self.k_norm = None
        self.out = RowParallelLinear(cfg.num_heads * cfg.head_size, cfg.hidden_size, tp, cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        hpg, hd = self.heads_per_group, self.head_size
        qkv = self.qkv(x).view(b, s, self.groups, hpg + 2, hd)  # [batch, seq, groups, q heads + k + v, head]
        q, k, v = qkv[:, :, :, :hpg], qkv[:, :, :, hpg], qkv[:, :, :, hpg + 1]  # k, v: [batch, seq, groups, head]
        if self.q_norm is not None:  # normed over [local heads x head], statistics over all ranks' heads
            q = self.q_norm(q.reshape(b, s, -1)).view(b, s, self.groups, hpg, hd)
            k = self.k_norm(k.reshape(b, s, -1)).view(b, s, self.groups, hd)
        q = q.reshape(b, s, self.groups * hpg, hd).transpose(1, 2)  # [batch, heads, seq, head]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [batch, groups, seq, head]
        if self.rope is not None:
            cos, sin = cached_cos_sin(self.rope, s, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout_p if self.training else 0.0
        if p > 0 and self.rng is not None:
            with self.rng.fork():  # heads differ per TP rank, so must their dropout masks
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
        y = y.transpose(1, 2).reshape(b, s, self.groups * hpg * hd)  # [batch, seq, local heads x head]
        return self.out(y)


class MLP(nn.Module):
    """GELU or ReLU MLP, or gated (SwiGLU, GeGLU); the fused gate/up weight holds rows [gate_u, up_u] per unit u."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.gated, self.act = cfg.gated, activation_fn(cfg)
        if self.gated:
            self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_size, tp, cfg.bias)
        else:
            self.fc_in = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_size, tp, cfg.bias)
        self.fc_out = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, tp, cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate_up = self.gate_up(x).unflatten(-1, (-1, 2))  # [batch, seq, local ffn, 2]
            h = self.act(gate_up[..., 0]) * gate_up[..., 1]
        else:
            h = self.act(self.fc_in(x))  # [batch, seq, local ffn]
        return self.fc_out(h)


class TransformerBlock(nn.Module):
    """Attention then MLP, each a residual step with its norm before, after or on the branch (`residual`);
    or both branches on x (parallel residual)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, rng: TPRNGTracker | None = None):
        super().__init__()
        self.parallel_residual, self.placement = cfg.parallel_residual, cfg.norm_placement
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg, tp, rng)
        self.mlp_norm = build_norm(cfg)
        self.mlp = MLP(cfg, tp)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel_residual:  # GPT-NeoX: the MLP reads the block input, not the attention's output
            return x + self.dropout(self.attn(self.attn_norm(x))) + self.dropout(self.mlp(self.mlp_norm(x)))
        x = residual(x, self.attn, self.attn_norm, self.placement, self.dropout)
        return residual(x, self.mlp, self.mlp_norm, self.placement, self.dropout)


def embedding_scale(cfg: ModelConfig) -> float | None:
    """Gemma multiplies the token embeddings by sqrt(hidden_size); None for the other models."""
    return cfg.hidden_size ** 0.5 if cfg.scale_embeddings else None


def embed(tokens: torch.Tensor, word: nn.Module, scale: float | None, project_in: nn.Module,
          position: nn.Module | None, offset: int) -> torch.Tensor:
    """The block input [batch, seq, hidden]: token embedding, scaled (Gemma), projected to the hidden size and plus
    learned positions (OPT reads position p at row p + 2). Shared by the TP model and the reference."""
    x = word(tokens)  # [batch, seq, embed]
    if scale is not None:  # rounded to the activations' dtype first, as Gemma does
        x = x * torch.tensor(scale, dtype=x.dtype, device=x.device)
    x = project_in(x)  # [batch, seq, hidden]; the identity unless embed_size != hidden_size
    if position is not None:
        x = x + position(torch.arange(offset, offset + tokens.shape[1], device=tokens.device))
    return x


class Embedding(nn.Module):
    """Token embedding (vocabulary split across TP), then project_in and learned positions when configured."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.word = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.embedding_size, tp)
        self.scale, self.offset = embedding_scale(cfg), cfg.position_offset
        self.project_in = nn.Linear(cfg.embedding_size, cfg.hidden_size, bias=False) if cfg.has_projections \
            else nn.Identity()  # replicated: small, and its input (the embedding) is replicated
        self.position = PositionEmbedding(cfg.max_seq_len + cfg.position_offset, cfg.hidden_size) \
            if cfg.position == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(embed(tokens, self.word, self.scale, self.project_in, self.position, self.offset))


def build_final_layers(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """(final_norm, project_out) between the last block and the LM head; nn.Identity where the model has none."""
    final_norm = build_norm(cfg) if cfg.final_norm else nn.Identity()
    project_out = nn.Linear(cfg.hidden_size, cfg.embedding_size, bias=False) if cfg.has_projections \
        else nn.Identity()
    return final_norm, project_out


def parallel_logits(x: torch.Tensor, weight: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Local vocabulary logits [batch, seq, V_padded / tp] from the final hidden states."""
    return F.linear(copy_to_tp_region(x, tp), weight)


class GPT(nn.Module):
    """The whole model on one pipeline stage (PP=1), at any TP degree."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None, rng: TPRNGTracker | None = None):
        super().__init__()
        tp = tp or TPGroup()
        self.cfg, self.tp = cfg, tp
        self.embedding = Embedding(cfg, tp)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, tp, rng) for _ in range(cfg.num_layers))
        self.final_norm, self.project_out = build_final_layers(cfg)
        self.lm_head = None if cfg.tied_embeddings else ColumnParallelLinear(
            cfg.embedding_size, cfg.padded_vocab_size, tp, bias=False)

    def local_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        x = self.project_out(self.final_norm(x))  # [batch, seq, embed]
        weight = self.embedding.word.weight if self.lm_head is None else self.lm_head.weight
        return parallel_logits(x, weight, self.tp)  # [batch, seq, V_padded / tp]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss when labels are given, else full logits [batch, seq, vocab] (padding dropped)."""
        logits = self.local_logits(tokens)
        if labels is not None:
            return vocab_parallel_cross_entropy(logits, labels, self.tp, self.cfg.vocab_size).mean()
        return gather_from_tp_region(logits, self.tp)[..., : self.cfg.vocab_size]
