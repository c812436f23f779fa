"""A plain single-process GPT: the oracle for every TP/PP test and the model `load_model` returns.

Same architecture and the same global parameter names as `megaclone.model.gpt.GPT`, written with
ordinary torch modules and no parallelism, so it can be read in one sitting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaclone.config import ModelConfig
from megaclone.model.gpt import (
    activation_fn,
    apply_rope,
    build_final_layers,
    build_norm,
    build_rope,
    embed,
    embedding_scale,
    residual,
)


class RefAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.rope = cfg, build_rope(cfg)
        self.qkv = nn.Linear(cfg.hidden_size, cfg.num_query_groups * (cfg.heads_per_group + 2) * cfg.head_size,
                             bias=cfg.has_qkv_bias)
        if cfg.qk_norm:  # over all q heads and over all k heads (OLMo-2)
            self.q_norm, self.k_norm = build_norm(cfg, cfg.num_heads * cfg.head_size), \
                build_norm(cfg, cfg.num_query_groups * cfg.head_size)
        else:
            self.q_norm = self.k_norm = None
        self.out = nn.Linear(cfg.num_heads * cfg.head_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, (b, s, _) = self.cfg, x.shape
        g, hpg, hd = cfg.num_query_groups, cfg.heads_per_group, cfg.head_size
        qkv = self.qkv(x).view(b, s, g, hpg + 2, hd)  # [batch, seq, groups, q heads + k + v, head]
        q, k, v = qkv[:, :, :, :hpg], qkv[:, :, :, hpg], qkv[:, :, :, hpg + 1]  # k, v: [batch, seq, groups, head]
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(b, s, -1)).view(b, s, g, hpg, hd)
            k = self.k_norm(k.reshape(b, s, -1)).view(b, s, g, hd)
        q = q.reshape(b, s, g * hpg, hd).transpose(1, 2)  # [batch, heads, seq, head]
        k = k.repeat_interleave(hpg, dim=2).transpose(1, 2)  # one k per query head
        v = v.repeat_interleave(hpg, dim=2).transpose(1, 2)
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(s, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = cfg.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, g * hpg * hd))


class RefMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated, self.act = cfg.gated, activation_fn(cfg)
        if self.gated:
            self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_size, bias=cfg.bias)  # rows [gate_u, up_u]
        else:
            self.fc_in = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up(x).unflatten(-1, (-1, 2)).unbind(-1)
            return self.fc_out(self.act(gate) * up)
        return self.fc_out(self.act(self.fc_in(x)))


class RefBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel_residual, self.placement = cfg.parallel_residual, cfg.norm_placement
        self.attn_norm, self.attn = build_norm(cfg), RefAttention(cfg)
        self.mlp_norm, self.mlp = build_norm(cfg), RefMLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel_residual:  # GPT-NeoX: both branches read the block input
            return x + self.dropout(self.attn(self.attn_norm(x))) + self.dropout(self.mlp(self.mlp_norm(x)))
        x = residual(x, self.attn, self.attn_norm, self.placement, self.dropout)
        return residual(x, self.mlp, self.mlp_norm, self.placement, self.dropout)


class RefEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.padded_vocab_size, cfg.embedding_size)
        self.scale, self.offset = embedding_scale(cfg), cfg.position_offset
        self.project_in = nn.Linear(cfg.embedding_size, cfg.hidden_size, bias=False) if cfg.has_projections \
            else nn.Identity()
        self.position = nn.Embedding(cfg.max_seq_len + cfg.position_offset, cfg.hidden_size) \
            if cfg.position == "learned" else None


def fill_norms(module: nn.Module) -> None:
    """Give the norms torch's own initial values (gain 1, bias 0). The TP/PP model leaves them for the spec table
    or a checkpoint to fill (so a launch writes every parameter once); the reference is a plain torch model that is
    usable as soon as it is built."""
    for m in module.modules():
        for base in (nn.LayerNorm, nn.RMSNorm):
            if isinstance(m, base):
                base.reset_parameters(m)


class ReferenceGPT(nn.Module):
    """Full (unsharded) model in one process: `model(tokens)` -> logits [batch, seq, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = RefEmbedding(cfg)
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm, self.project_out = build_final_layers(cfg)
        self.lm_head = None if cfg.tied_embeddings else nn.Linear(cfg.embedding_size, cfg.padded_vocab_size,
                                                                  bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        fill_norms(self)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over real-vocabulary logits when labels are given, else logits [batch, seq, vocab]."""
        e = self.embedding
        x = self.dropout(embed(tokens, e.word, e.scale, e.project_in, e.position, e.offset))
        for block in self.blocks:
            x = block(x)
        x = self.project_out(self.final_norm(x))  # [batch, seq, embed]
        weight = self.embedding.word.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)[..., : self.cfg.vocab_size]  # padding never counts
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
